"""The experience log's sustained rate (`make bench`): ExperienceLog driven in-process as the
decision routes drive it, with its real writer thread writing real Parquet into a temporary dir.

For each shape (1,024-row pieces as one /predict_batch naming 1,024 agents makes, 1-row pieces as
/predict makes), a producer calls `admit()` then `record_steps()` with the default example's real
decisions for `--seconds`; a refused admission (the writer behind by `max_pending_rows`) waits a
millisecond, as a client told 503 would. Then the log closes (the last flush and the merge), and
the rows are read back and counted. Rows/s accepted is over the producing time; rows/s written is
rows on disk over the time until the flush that wrote the last of them. Writes
bench/experience_writer.json; bench/run.py puts it in RESULTS.md.

    python bench/experience_writer.py                       # 10 s per shape
    python bench/experience_writer.py --seconds 0.5 --out /tmp/w
"""

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from policy_server.experience.episodes import AgentRef  # noqa: E402
from policy_server.experience.errors import ExperienceUnavailable  # noqa: E402
from policy_server.experience.log import ExperienceLog  # noqa: E402
from policy_server.loading import load_policy, load_policy_spec  # noqa: E402
from policy_server.policy import Decisions, Kind, Policy, Task  # noqa: E402
from policy_server.schema import Experience, PolicySpec  # noqa: E402
from policy_server.settings import Settings  # noqa: E402

MOUSE = REPO / "examples" / "mouse_and_cheese"
SHAPES = {"batch1024": 1024, "single": 1}  # rows per piece
POOL = 16  # distinct observation batches per shape, cycled (so compression sees varied rows)
SINGLE_EPISODES = 64  # the 1-row pieces cycle over this many episodes, as /predict's clients do
REFUSED_WAIT_S = 0.001
POLL_S = 0.002
TARGET_ROWS_PER_S = 100_000
RESULTS = "experience_writer.json"


@dataclass(frozen=True)
class Shape:
    name: str
    rows_per_piece: int
    seconds: float  # producing
    pieces: int
    rows: int  # accepted, and read back from disk (the script fails if they differ)
    refused: int  # admissions refused while the writer was behind
    peak_pending_rows: int
    accepted_rows_per_s: float
    written_rows_per_s: float
    last_flush_s: float  # from the start to the flush that wrote the last row
    close_s: float  # the last flush and the merge of the chunks into one file per partition
    writer_cpu_s: float  # the writer thread's CPU time, all of it (flushes and the merge)
    chunks: int  # files the flushes wrote (one per flush and partition), merged at close
    files: int  # on disk after close
    bytes_per_row: float


def random_rows(spec: PolicySpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """Observations within the schema's bounds, whole numbers as the example's grid has."""
    columns = [rng.integers(int(obs.minimum or 0), int(obs.maximum or 0) + 1, count) for obs in spec.observations or ()]
    return np.stack(columns, axis=1).astype(np.float32)


def pool(policy: Policy, spec: PolicySpec, rows_per_piece: int, rng: np.random.Generator) -> list[tuple[np.ndarray, Decisions]]:
    """Real decisions of the default example, as the routes hand them to the log."""
    pieces = []
    for _ in range(POOL):
        rows = random_rows(spec, rows_per_piece, rng)
        (decisions,) = policy.run([Task(rows, Kind.SAMPLE)])
        assert isinstance(decisions, Decisions)
        pieces.append((rows, decisions))
    return pieces


def agents(rows_per_piece: int) -> list[list[AgentRef]]:
    """Whom each piece names: one episode of 1,024 agents for a batch, or one of many single-agent episodes."""
    if rows_per_piece == 1:
        return [[AgentRef(f"c{index}")] for index in range(SINGLE_EPISODES)]
    return [[AgentRef("batch", f"a{index}") for index in range(rows_per_piece)]]


def thread_cpu_s(thread: threading.Thread) -> float | None:
    """A running thread's CPU time (user and system), from /proc; None once it has ended."""
    try:
        fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watch(threading.Thread):
    """Polls the writer: the highest pending count, when the written count last moved, and the
    CPU time of its thread (the one named after the policy) until it ends."""

    def __init__(self, log: ExperienceLog, started: float) -> None:
        super().__init__(daemon=True)
        self.log, self.started = log, started
        self.writer = next(thread for thread in threading.enumerate() if thread.name == f"experience-{log.policy}")
        self.peak_pending = 0
        self.last_written, self.last_write_s = 0, 0.0
        self.writer_cpu_s = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(POLL_S):
            self.poll()
        self.poll()  # a flush it had no turn to see (a short run's only flush, at close)

    def poll(self) -> None:
        state = self.log.writer.state
        self.peak_pending = max(self.peak_pending, state.pending_rows)
        if state.written_rows != self.last_written:
            self.last_written, self.last_write_s = state.written_rows, time.perf_counter() - self.started
        self.writer_cpu_s = thread_cpu_s(self.writer) or self.writer_cpu_s


async def produce(
    log: ExperienceLog, spec: PolicySpec, pieces: list[tuple[np.ndarray, Decisions]], refs: list[list[AgentRef]], until: float
) -> tuple[int, int]:
    """Pieces into the log, as the routes put them, until `until` (perf_counter): (pieces, refusals)."""
    count = refused = 0
    while time.perf_counter() < until:
        try:
            log.admit()
        except ExperienceUnavailable:
            refused += 1
            await asyncio.sleep(REFUSED_WAIT_S)
            continue
        rows, decisions = pieces[count % POOL]
        await log.record_steps(spec, refs[count % len(refs)], rows, decisions, deterministic=False)
        count += 1
    return count, refused


def measure(name: str, rows_per_piece: int, seconds: float, policy: Policy, spec: PolicySpec, folder: Path) -> Shape:
    pieces, refs = pool(policy, spec, rows_per_piece, np.random.default_rng(rows_per_piece)), agents(rows_per_piece)
    log = ExperienceLog(Experience(folder), spec.name)  # the defaults: flush every 1 s, 200,000 rows pending at most
    log.start()
    started = time.perf_counter()
    watch = Watch(log, started)
    watch.start()
    count, refused = asyncio.run(produce(log, spec, pieces, refs, started + seconds))
    accepted = count * rows_per_piece
    produced_s = time.perf_counter() - started
    closing = time.perf_counter()
    log.close()
    close_s = time.perf_counter() - closing
    watch.done.set()
    watch.join()
    on_disk = ds.dataset(folder, format="parquet", partitioning="hive").count_rows()
    if on_disk != accepted or log.writer.state.written_rows != accepted:
        raise SystemExit(f"experience_writer: {accepted:,} rows accepted, {on_disk:,} read back from {folder}")
    files = sorted(folder.rglob("*.parquet"))
    size = sum(path.stat().st_size for path in files)
    return Shape(
        name=name,
        rows_per_piece=rows_per_piece,
        seconds=round(produced_s, 3),
        pieces=count,
        rows=accepted,
        refused=refused,
        peak_pending_rows=watch.peak_pending,
        accepted_rows_per_s=round(accepted / produced_s),
        written_rows_per_s=round(accepted / watch.last_write_s) if watch.last_write_s else 0,
        last_flush_s=round(watch.last_write_s, 3),
        close_s=round(close_s, 3),
        writer_cpu_s=round(watch.writer_cpu_s, 2),
        chunks=log.writer.state.files,
        files=len(files),
        bytes_per_row=round(size / accepted, 2) if accepted else 0.0,
    )


def section(shapes: list[dict[str, Any]]) -> list[str]:
    """RESULTS.md's lines for the writer: its table and its target."""
    lines = [
        "| pieces of | seconds | rows | rows/s accepted | rows/s written | last flush s | close s | refused | peak pending | chunks "
        "| writer CPU s | rows per writer CPU s | bytes/row |",
        "| --- |" + " ---: |" * 12,
    ]
    for s in shapes:
        lines.append(
            f"| {s['rows_per_piece']:,} row{'s' if s['rows_per_piece'] > 1 else ''} | {s['seconds']:.1f} | {s['rows']:,} | "
            f"{s['accepted_rows_per_s']:,.0f} | {s['written_rows_per_s']:,.0f} | {s['last_flush_s']:.2f} | {s['close_s']:.2f} | "
            f"{s['refused']:,} | {s['peak_pending_rows']:,} | {s['chunks']} | {s['writer_cpu_s']:.2f} | "
            f"{s['rows'] / s['writer_cpu_s'] if s['writer_cpu_s'] else 0:,.0f} | {s['bytes_per_row']:.1f} |"
        )
    return lines


def targets(shapes: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """Issue 14's writer target, per shape: (label, met, figure)."""
    return [
        (
            f"experience writer ≥ {TARGET_ROWS_PER_S:,} rows/s written ({s['rows_per_piece']:,}-row pieces)",
            s["written_rows_per_s"] >= TARGET_ROWS_PER_S,
            f"{s['written_rows_per_s']:,.0f} rows/s ({s['accepted_rows_per_s']:,.0f} accepted)",
        )
        for s in shapes
    ]


def read(folder: Path) -> list[dict[str, Any]]:
    path = folder / RESULTS
    return json.loads(path.read_text()) if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="producing time per shape")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    parser.add_argument("--out", type=Path, default=REPO / "bench", help=f"where {RESULTS} goes")
    args = parser.parse_args()
    spec = load_policy_spec(MOUSE)
    policy = load_policy(MOUSE, spec, cache_dir=Settings.from_env().model_cache_dir)
    gc.freeze()  # as the server does once started: torch's and the model's objects out of the collector's sight
    shapes = []
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory(prefix="experience-writer-") as folder:
            shapes.append(measure(name, SHAPES[name], args.seconds, policy, spec, Path(folder)))
        print(shapes[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS).write_text(json.dumps([asdict(shape) for shape in shapes], indent=1) + "\n")
    print(f"wrote {args.out / RESULTS}")


if __name__ == "__main__":
    main()
