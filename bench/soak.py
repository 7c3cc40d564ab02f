"""The soak (`make soak`): the default example under 64 clients for 10 minutes, served as users run it.

The load comes in slices of wrk; after each slice the harness reads the server's RSS and open
file descriptors. It passes when no request failed and neither RSS nor descriptors grew from
the first slice to the last beyond a small allowance (the first slice warms caches and the
allocator up). It writes bench/SOAK.md and bench/soak.json.

    python bench/soak.py                        # 10 minutes, 64 clients
    python bench/soak.py --minutes 1 --out /tmp/soak
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from run import MOUSE, MOUSE_OBSERVATION, REPO, Config, Workload, server, tree_rss_mib, wrk

SLICE_S = 30
RSS_GROWTH_ALLOWED_MIB = 16.0
FD_GROWTH_ALLOWED = 4
SETTLE_READS = 6


@dataclass(frozen=True)
class Slice:
    minute: float
    requests_per_s: float
    p99_ms: float
    errors: int
    rss_mib: float
    open_fds: int


def open_descriptors(pid: int) -> int:
    """After wrk's connections are closed on the server's side too (it sees their ends a moment later)."""
    counts = []
    for _ in range(SETTLE_READS):
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        time.sleep(0.5)
    return min(counts)


def soak(minutes: float, clients: int, scratch: Path) -> list[Slice]:
    command = [sys.executable, str(REPO / "generate.py"), "serve", "--directory", str(MOUSE), "--log-level", "warning"]
    config = Config("soak", lambda port: [*command, "--port", str(port)], "mouse")
    workload = Workload("predict", "/predict", MOUSE_OBSERVATION, 1)
    slices = []
    with server(config, MOUSE, scratch / "cache") as (url, process, _):
        for index in range(max(1, round(minutes * 60 / SLICE_S))):
            result = wrk(url, workload, clients, SLICE_S, scratch)
            slices.append(
                Slice(
                    minute=round((index + 1) * SLICE_S / 60, 2),
                    requests_per_s=result["requests_per_s"],
                    p99_ms=result["p99_ms"],
                    errors=int(result["errors"]),
                    rss_mib=round(tree_rss_mib(process.pid), 1),
                    open_fds=open_descriptors(process.pid),
                )
            )
            print(slices[-1], flush=True)
    return slices


def verdict(slices: list[Slice]) -> tuple[bool, str]:
    errors = sum(part.errors for part in slices)
    rss_growth = slices[-1].rss_mib - slices[0].rss_mib
    fd_growth = slices[-1].open_fds - slices[0].open_fds
    passed = errors == 0 and rss_growth <= RSS_GROWTH_ALLOWED_MIB and fd_growth <= FD_GROWTH_ALLOWED
    summary = (
        f"{errors} errors in {sum(part.requests_per_s * SLICE_S for part in slices):,.0f} requests; "
        f"RSS {slices[0].rss_mib:.0f} → {slices[-1].rss_mib:.0f} MiB (allowed growth {RSS_GROWTH_ALLOWED_MIB:.0f}); "
        f"open descriptors {slices[0].open_fds} → {slices[-1].open_fds} (allowed growth {FD_GROWTH_ALLOWED})"
    )
    return passed, summary


def report(slices: list[Slice], clients: int, passed: bool, summary: str) -> str:
    lines = [
        "# Soak",
        "",
        f"`make soak` on {datetime.date.today()}: `generate.py serve` on the default example, /predict from wrk with "
        f"{clients} connections, in {SLICE_S} s slices; RSS (the server's process tree) and open descriptors after each.",
        "",
        f"**{'PASS' if passed else 'FAIL'}**: {summary}.",
        "",
        "| minute | requests/s | p99 ms | errors | RSS MiB | open fds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {part.minute} | {part.requests_per_s:,.0f} | {part.p99_ms:.2f} | {part.errors} | {part.rss_mib:.0f} | {part.open_fds} |"
        for part in slices
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        slices = soak(args.minutes, args.clients, Path(scratch))
    passed, summary = verdict(slices)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "SOAK.md").write_text(report(slices, args.clients, passed, summary))
    (args.out / "soak.json").write_text(json.dumps([asdict(part) for part in slices], indent=1) + "\n")
    print(("PASS: " if passed else "FAIL: ") + summary)
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
