"""Rows to Parquet files, on a thread of their own: the event loop only appends to a list.

Every flush interval the thread takes what is pending and writes, per partition, one small
Parquet file (a chunk: written under a hidden name, then renamed, so a file visible under its
final name is always whole). A partition's chunks form a segment; once the segment reaches the
size or age to rotate at (or the writer closes), its chunks are merged into one file, renamed
into place, and the chunks removed. After a SIGKILL at most the last interval's rows are missing:
the chunks written before are on disk, whole; a merge cut short is finished by the next start.

When a write fails (a full disk, a read-only directory), the rows stay pending and are tried
again at the next interval; meanwhile `refusal()` says why, and the log refuses new episodes' steps
(503) rather than accept rows it may not keep. Pending rows are bounded the same way.
"""

import contextlib
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from policy_server.schema import Experience

logger = logging.getLogger("policy_server")

TableOf = Callable[[Sequence[Any]], pa.Table]  # a partition's pending pieces → one table
_COMPRESSION = "zstd"
_HIDDEN = "_"  # readers skip files starting with "_" or "."
# rows: a merge holds at most this many (and one chunk) in memory at a time; DuckDB's own row groups are ~122,880
_MERGED_ROW_GROUP = 131_072


@dataclass(frozen=True, eq=False)
class Partition:
    """One directory of one table: `DIR/steps/policy=P/version=V/date=D`, and how its pieces
    become a table. The log makes one object per directory and layout and keeps it, so it is a
    dict key by identity: every `put` looks one up, and hashing the fields cost more."""

    path: Path
    table_of: TableOf  # two layouts of one directory (a schema changed) are two partitions


@dataclass
class _Queued:
    """A partition's pieces waiting for the next flush, in the order they came."""

    pieces: list[Any] = field(default_factory=list)
    rows: int = 0

    def extend(self, later: "_Queued") -> None:
        self.pieces.extend(later.pieces)
        self.rows += later.rows


@dataclass
class _Segment:
    """The chunks of one partition that will be merged into one file."""

    partition: Partition
    number: int
    started: float
    chunks: list[Path] = field(default_factory=list)
    bytes: int = 0


@dataclass
class WriterState:
    """What /info and the metrics say of the writer."""

    pending_rows: int = 0
    written_rows: int = 0
    files: int = 0
    error: str | None = None  # the last write's failure, until a write succeeds


class ExperienceWriter:
    def __init__(self, config: Experience, name: str) -> None:
        self.config = config
        self.name = name  # the policy's, for the log
        self.state = WriterState()
        self._tag = _process_tag()
        self._lock = threading.Lock()
        self._pending: dict[Partition, _Queued] = {}
        self._segments: dict[Partition, _Segment] = {}
        self._segment_numbers = 0
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"experience-{name}", daemon=True)
        # pyarrow imports pandas (when installed) at its first conversion: let that be now, as the
        # server starts and before it freezes its start-up objects (gc.freeze), not at the first
        # flush under load (~1 s on this thread, then every full collection rescanning pandas).
        pa.array([0])

    def start(self) -> None:
        self._thread.start()

    def put(self, partition: Partition, piece: Any, rows: int) -> None:
        """Queue a piece of `rows` rows for the next flush (the event loop: no disk, one short lock)."""
        with self._lock:
            queued = self._pending.get(partition)
            if queued is None:
                queued = self._pending[partition] = _Queued()
            queued.pieces.append(piece)
            queued.rows += rows
            self.state.pending_rows += rows

    def refusal(self) -> str | None:
        """Why no more rows should be accepted now, or None."""
        if self.state.error is not None:
            return f"the experience log of policy '{self.name}' cannot be written ({self.state.error})"
        if self.state.pending_rows >= self.config.max_pending_rows:
            return f"the experience log of policy '{self.name}' is behind: {self.state.pending_rows:,} rows wait for the disk"
        return None

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.config.flush_s))

    def close(self) -> None:
        """Write everything pending, merge every segment, stop the thread (blocks: call off the loop)."""
        self._closing = True
        self._wake.set()
        self._thread.join()
        if self.state.pending_rows:
            logger.error(
                "experience log of %s: %s rows could not be written to %s (%s) and are lost",
                self.name,
                self.state.pending_rows,
                self.config.dir,
                self.state.error,
            )

    def _run(self) -> None:
        finish_merges(self.config.dir)
        while not self._closing:
            self._wake.wait(self.config.flush_s)
            self._flush()
            self._rotate(lambda segment: self._due(segment))
        self._flush()
        self._rotate(lambda segment: True)

    def _flush(self) -> None:
        with self._lock:
            taken, self._pending = self._pending, {}
        unwritten: dict[Partition, _Queued] = {}
        for partition, queued in taken.items():
            try:
                self._write_chunk(partition, partition.table_of(queued.pieces))
            except OSError as exc:
                self._failed(exc)
                unwritten[partition] = queued
                continue
            with self._lock:
                self.state.pending_rows -= queued.rows
                self.state.written_rows += queued.rows
        if unwritten:  # first in line at the next try, before what arrived meanwhile
            with self._lock:
                for partition, arrived in self._pending.items():
                    if partition in unwritten:
                        unwritten[partition].extend(arrived)
                self._pending = {**self._pending, **unwritten}

    def _write_chunk(self, partition: Partition, table: pa.Table) -> None:
        segment = self._segments.get(partition)
        if segment is None:
            self._segment_numbers += 1
            segment = self._segments[partition] = _Segment(partition, self._segment_numbers, time.monotonic())
        partition.path.mkdir(parents=True, exist_ok=True)
        chunk = partition.path / f"{self._final_name(segment)[: -len('.parquet')]}-c{len(segment.chunks):05d}.parquet"
        _write_whole(table, chunk)
        segment.chunks.append(chunk)
        segment.bytes += chunk.stat().st_size
        self.state.files += 1
        self.state.error = None

    def _due(self, segment: _Segment) -> bool:
        old = time.monotonic() - segment.started >= self.config.rotate_minutes * 60
        return old or segment.bytes >= self.config.rotate_mb * 1024 * 1024

    def _rotate(self, due: Callable[[_Segment], bool]) -> None:
        for partition, segment in list(self._segments.items()):
            if not due(segment):
                continue
            try:
                merge_chunks(segment.chunks, partition.path / self._final_name(segment))
            except OSError as exc:  # the chunks stay, whole: merged at a later rotation
                self._failed(exc)
                continue
            finally:
                _return_merge_memory()
            del self._segments[partition]
            self.state.error = None

    def _final_name(self, segment: _Segment) -> str:
        return f"part-{self._tag}-{segment.number:05d}.parquet"

    def _failed(self, exc: OSError) -> None:
        reason = exc.strerror or type(exc).__name__
        if self.state.error != reason:
            logger.error("experience log of %s: cannot write to %s: %s; kept in memory, tried again", self.name, self.config.dir, exc)
        self.state.error = reason


def _process_tag() -> str:
    """Names this process's files apart from every other's, on this machine and others."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{time.time_ns() // 1_000_000}"


@contextlib.contextmanager
def _whole(path: Path) -> Iterator[Path]:
    """Write under a hidden name, renamed to `path` once written: the final name only ever holds a
    whole file."""
    hidden = path.with_name(f"{_HIDDEN}{path.name}.tmp")
    try:
        yield hidden
        os.replace(hidden, path)
    except OSError:
        hidden.unlink(missing_ok=True)
        raise


def _write_whole(table: pa.Table, path: Path) -> None:
    with _whole(path) as hidden:
        pq.write_table(table, hidden, compression=_COMPRESSION)


def merge_chunks(chunks: list[Path], final: Path) -> None:
    """The chunks into one file, in row groups of about _MERGED_ROW_GROUP rows: a segment of
    `rotate_mb` holds millions of rows, and read whole it took ~280 bytes of memory per row."""
    if len(chunks) == 1:
        os.replace(chunks[0], final)
        return
    with _whole(final) as hidden, pq.ParquetWriter(hidden, pq.read_schema(chunks[0]), compression=_COMPRESSION) as merged:
        buffered: list[pa.Table] = []
        for index, chunk in enumerate(chunks):
            buffered.append(pq.read_table(chunk))
            if index == len(chunks) - 1 or sum(table.num_rows for table in buffered) >= _MERGED_ROW_GROUP:
                merged.write_table(pa.concat_tables(buffered))
                buffered = []
    for chunk in chunks:
        chunk.unlink(missing_ok=True)


def _return_merge_memory() -> None:
    """Give the merge's buffers back to the system. Arrow's allocator (mimalloc) keeps freed pages
    for reuse: without this, RSS stayed near each merge's peak for a while after it."""
    pa.default_memory_pool().release_unused()


_CHUNK = re.compile(r"^(part-.+)-c\d{5}\.parquet$")


def finish_merges(root: Path) -> None:
    """Remove the chunks whose merged file exists: a merge that a crash cut short after the rename."""
    if not root.is_dir():
        return
    for chunk in root.rglob("part-*-c*.parquet"):
        match = _CHUNK.match(chunk.name)
        if match and (chunk.parent / f"{match.group(1)}.parquet").exists():
            chunk.unlink(missing_ok=True)
