"""The benchmark harness runs end to end (a second per run): servers start, wrk drives them, the
report is written. No figure is asserted: speed is measured by `make bench`, not by tests."""

import json
import subprocess
import sys
from pathlib import Path

from servers import REPO


def test_harness_runs_end_to_end(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--duration",
        "1",
        "--configs",
        "reference,local",
        "--no-sweep",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, timeout=300, cwd=REPO, capture_output=True)
    runs = json.loads((tmp_path / "results.json").read_text())
    assert {(r["config"], r["workload"], r["concurrency"]) for r in runs} == {
        (config, "predict", c) for config in ("reference", "local") for c in (1, 32)
    } | {(config, "batch1024", 1) for config in ("reference", "local")}
    assert all(r["requests_per_s"] > 0 and r["errors"] == 0 and r["rss_mib"] > 0 for r in runs)
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| local | predict | 32 |" in report and "## Targets" in report


def test_the_repository_rows_run_end_to_end(tmp_path: Path) -> None:
    """Ten policies against one, and versions published under wrk: every phase answered, the switch seen."""
    command = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--duration",
        "1",
        "--configs",
        "repo-1,repo-10,switch-under-load",
        "--no-sweep",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, timeout=600, cwd=REPO, capture_output=True)
    runs = {(r["config"], r["workload"], r["concurrency"]): r for r in json.loads((tmp_path / "results.json").read_text())}
    assert {key for key in runs if key[0] == "switch-under-load"} == {
        ("switch-under-load", f"predict:{phase}", 32) for phase in ("before", "during", "after")
    }
    assert {("repo-1", "predict", 32), ("repo-10", "predict", 32)} <= set(runs)
    assert all(r["requests_per_s"] > 0 and r["errors"] == 0 and r["rss_mib"] > 0 for r in runs.values())
    assert runs["switch-under-load", "predict:during", 32]["switch_s"] > 0
    targets = (tmp_path / "RESULTS.md").read_text().split("## Targets")[1]
    assert "memory per extra policy" in targets and "no failed request: 0 failed requests" in targets
