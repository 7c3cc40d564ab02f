"""The soak (`make soak`): the default example under 64 clients for 10 minutes, served as users run it.

The load comes in slices of wrk; after each slice the harness reads the server's RSS and open
file descriptors (and, sampled through the slice, its highest RSS). It passes when no request
failed and neither RSS nor descriptors grew from the baseline slice to the last beyond a small
allowance: the baseline is the first slice (it warms caches and the allocator up) or, logging
experience, the slice of the first merge (a merge's buffers are allocated once and reused: the
first one is a step, and a leak shows as growth after it).

With `--experience` (`make soak-experience`) the policy logs its decisions (a copy of the example
whose schema has an `experience:` section, files rotated every ROTATE_MINUTES so that the run
includes merges) and every request names an episode; after each slice the harness also reads the
log's state from /info. It passes when, besides the above, no request was refused for the log
being behind, and once the server has stopped the files hold a row for every step the log took.

Each mode writes its own JSON (bench/soak.json, bench/soak-experience.json); bench/SOAK.md shows
every mode measured so far.

    python bench/soak.py                        # 10 minutes, 64 clients
    python bench/soak.py --minutes 1 --out /tmp/soak
    python bench/soak.py --experience           # the same, logging experience
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.dataset as ds
from run import API_KEY, MOUSE, MOUSE_OBSERVATION, REPO, Config, Workload, server, tree_rss_mib, wrk

SLICE_S = 30
RSS_GROWTH_ALLOWED_MIB = 16.0
FD_GROWTH_ALLOWED = 4
SETTLE_READS = 6
SAMPLE_S = 0.2
ROTATE_MINUTES = 2  # the experience log's files: a merge every 2 minutes (the default, 60, would merge only at shutdown)
MODES = {"plain": "soak.json", "experience": "soak-experience.json"}


@dataclass(frozen=True)
class Slice:
    minute: float
    requests_per_s: float
    p99_ms: float
    errors: int
    rss_mib: float
    open_fds: int
    rss_peak_mib: float | None = None  # the highest RSS sampled during the slice
    # With experience logging: the highest pending rows sampled during the slice, and after it the log's state and files
    pending_rows: int | None = None
    written_rows: int | None = None
    refused: int | None = None
    files: int | None = None
    disk_mib: float | None = None


@dataclass
class Soak:
    mode: str
    date: str
    minutes: float
    clients: int
    slices: list[Slice]
    rows_on_disk: int | None = None  # experience: every row in the files once the server stopped
    requests: int | None = None  # answered, as wrk counted them


class Peaks(threading.Thread):
    """The highest RSS of the server's process tree, and with `url` the highest rows pending in its
    experience log, since the last `take()`."""

    def __init__(self, pid: int, url: str | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.url, self.stopped = pid, url, threading.Event()
        self.rss, self.pending = 0.0, 0

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            self.rss = max(self.rss, tree_rss_mib(self.pid))
            if self.url is not None:
                self.pending = max(self.pending, experience_info(self.url)["pending_rows"])

    def take(self) -> dict[str, Any]:
        taken = {"rss_peak_mib": round(self.rss, 1)} | ({"pending_rows": self.pending} if self.url is not None else {})
        self.rss, self.pending = 0.0, 0
        return taken


def open_descriptors(pid: int) -> int:
    """After wrk's connections are closed on the server's side too (it sees their ends a moment later)."""
    counts = []
    for _ in range(SETTLE_READS):
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.5)
    return min(counts)


def logging_policy(scratch: Path, experience: Path) -> Path:
    """A copy of the default example whose schema logs its decisions into `experience`."""
    folder = scratch / "policy"
    shutil.copytree(MOUSE, folder, ignore=shutil.ignore_patterns("*.md", "train.py"))
    schema = folder / "schema.yaml"
    schema.write_text(schema.read_text() + f"experience: {{dir: {experience}, rotate_minutes: {ROTATE_MINUTES}}}\n")
    return folder


def experience_info(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/info", headers={"access-token": API_KEY}, timeout=10).json()["experience"])


def log_state(url: str, experience: Path) -> dict[str, Any]:
    """The Slice fields of the experience log after a slice: its /info, and the Parquet files under its dir."""
    state = experience_info(url)
    files = [path for path in experience.rglob("*.parquet") if not path.name.startswith(("_", "."))]
    return {
        "written_rows": state["written_rows"],
        "refused": state["refused_requests"],
        "files": len(files),
        "disk_mib": round(sum(path.stat().st_size for path in files) / 2**20, 1),
    }


def soak(minutes: float, clients: int, scratch: Path, logging: bool) -> Soak:
    experience = scratch / "experience"
    policy = logging_policy(scratch, experience) if logging else MOUSE
    command = [sys.executable, str(REPO / "generate.py"), "serve", "--directory", str(policy), "--log-level", "warning"]
    config = Config("soak", lambda port: [*command, "--port", str(port)], "mouse")
    workload = Workload("predict", "/predict", MOUSE_OBSERVATION, 1, episodes=logging)
    record = Soak("experience" if logging else "plain", datetime.date.today().isoformat(), minutes, clients, [], requests=0)
    with server(config, policy, scratch / "cache") as (url, process, _):
        peaks = Peaks(process.pid, url if logging else None)
        peaks.start()
        for index in range(max(1, round(minutes * 60 / SLICE_S))):
            result = wrk(url, workload, clients, SLICE_S, scratch)
            record.requests = (record.requests or 0) + int(result["requests"])
            record.slices.append(
                Slice(
                    minute=round((index + 1) * SLICE_S / 60, 2),
                    requests_per_s=result["requests_per_s"],
                    p99_ms=result["p99_ms"],
                    errors=int(result["errors"]),
                    rss_mib=round(tree_rss_mib(process.pid), 1),
                    open_fds=open_descriptors(process.pid),
                    **peaks.take(),
                    **(log_state(url, experience) if logging else {}),
                )
            )
            print(record.slices[-1], flush=True)
        peaks.stopped.set()
        peaks.join()  # before the server stops: it may be asking /info
    if logging:  # the server has stopped: it wrote what was pending and merged its files
        record.rows_on_disk = ds.dataset(experience / "steps", format="parquet", partitioning="hive").count_rows()
    return record


def baseline(record: Soak) -> Slice:
    """The slice growth is measured from: the first, or logging experience, the first merge's."""
    if record.mode != "experience":
        return record.slices[0]
    return next((part for part in record.slices if part.minute >= ROTATE_MINUTES), record.slices[0])


def verdict(record: Soak) -> tuple[bool, str]:
    slices = record.slices
    start = baseline(record)
    errors = sum(part.errors for part in slices)
    rss_growth = slices[-1].rss_mib - start.rss_mib
    fd_growth = slices[-1].open_fds - start.open_fds
    passed = errors == 0 and rss_growth <= RSS_GROWTH_ALLOWED_MIB and fd_growth <= FD_GROWTH_ALLOWED
    requests = f"{record.requests:,}" if record.requests else f"{sum(part.requests_per_s * SLICE_S for part in slices):,.0f}"
    summary = (
        f"{errors} errors in {requests} requests; "
        f"RSS {start.rss_mib:.0f} (minute {start.minute:g}) → {slices[-1].rss_mib:.0f} MiB (allowed growth {RSS_GROWTH_ALLOWED_MIB:.0f}; "
        f"first slice {slices[0].rss_mib:.0f}); open descriptors {start.open_fds} → {slices[-1].open_fds} (allowed growth {FD_GROWTH_ALLOWED})"
    )
    if record.mode == "experience":
        logged = slices[-1].written_rows or 0  # nothing pending: read after the slice's descriptors settled (3 s, the flush is 1 s)
        refused = slices[-1].refused or 0
        kept = record.rows_on_disk is not None and record.rows_on_disk >= logged
        passed = passed and refused == 0 and kept
        summary += (
            f"; {refused} requests refused by the log; {record.rows_on_disk or 0:,} rows on disk after the stop for "
            f"{logged:,} steps logged by the last slice; highest pending {max(part.pending_rows or 0 for part in slices):,} rows"
        )
    return passed, summary


HEADINGS = {
    "plain": "`make soak`: `generate.py serve` on the default example, /predict from wrk",
    "experience": "`make soak-experience`: the same, the policy logging experience (its schema's "
    f"`experience: {{dir: ..., rotate_minutes: {ROTATE_MINUTES}}}`: a merge every {ROTATE_MINUTES} minutes), "
    "every request naming an episode (`?episode_id=c<k>`, the connections' numbers in turn)",
}


def section(record: Soak) -> list[str]:
    passed, summary = verdict(record)
    logging = record.mode == "experience"
    lines = [
        f"## {'With experience logging' if logging else 'Without logging'}",
        "",
        f"{HEADINGS[record.mode]}, on {record.date}, with {record.clients} connections, in {SLICE_S} s slices; "
        "RSS (the server's process tree) and open descriptors after each"
        + (f", and the highest RSS sampled every {SAMPLE_S:g} s during it" if any(part.rss_peak_mib for part in record.slices) else "")
        + (
            f"; the log's highest pending rows (its /info, every {SAMPLE_S:g} s), its written rows and its files on disk after each."
            if logging
            else "."
        ),
        "",
        f"**{'PASS' if passed else 'FAIL'}**: {summary}.",
        "",
    ]
    header = "| minute | requests/s | p99 ms | errors | RSS MiB | highest RSS MiB | open fds |"
    if logging:
        lines += [header + " highest pending rows | written rows | files | on disk MiB |", "| ---: " * 11 + "|"]
    else:
        lines += [header, "| ---: " * 7 + "|"]
    for part in record.slices:
        peak = f"{part.rss_peak_mib:.0f}" if part.rss_peak_mib else "–"
        row = f"| {part.minute} | {part.requests_per_s:,.0f} | {part.p99_ms:.2f} | {part.errors} | {part.rss_mib:.0f} | {peak} | {part.open_fds} |"
        if logging:
            row += f" {part.pending_rows:,} | {part.written_rows:,} | {part.files} | {part.disk_mib:.1f} |"
        lines.append(row)
    return [*lines, ""]


def read(path: Path) -> Soak | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Soak(**{**data, "slices": [Slice(**part) for part in data["slices"]]})


def report(records: list[Soak]) -> str:
    lines = ["# Soak", ""]
    for record in records:
        lines += section(record)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--experience", action="store_true", help="the policy logs experience; requests name episodes")
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        record = soak(args.minutes, args.clients, Path(scratch), args.experience)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MODES[record.mode]).write_text(json.dumps(asdict(record), indent=1) + "\n")
    records = [found for name in MODES.values() if (found := read(args.out / name))]
    (args.out / "SOAK.md").write_text(report(records))
    passed, summary = verdict(record)
    print(("PASS: " if passed else "FAIL: ") + summary)
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
