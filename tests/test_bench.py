"""The benchmark harness runs end to end (a second per run): servers start, wrk drives them, the
report is written. No figure is asserted: speed is measured by `make bench`, not by tests."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from servers import REPO


def run_harness(configs: str, out: Path, timeout_s: float, environment: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`bench/run.py` for `configs`, a second per run, into `out`: its results.json rows."""
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--duration", "1", "--configs", configs, "--no-sweep", "--out", str(out)]
    subprocess.run(command, check=True, timeout=timeout_s, cwd=REPO, capture_output=True, env=os.environ | (environment or {}))
    return json.loads((out / "results.json").read_text())


def test_harness_runs_end_to_end(tmp_path: Path) -> None:
    runs = run_harness("reference,local", tmp_path, timeout_s=300)
    assert {(r["config"], r["workload"], r["concurrency"]) for r in runs} == {
        (config, "predict", c) for config in ("reference", "local") for c in (1, 32)
    } | {(config, "batch1024", 1) for config in ("reference", "local")}
    assert all(r["requests_per_s"] > 0 and r["errors"] == 0 and r["rss_mib"] > 0 for r in runs)
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| local | predict | 32 |" in report and "## Targets" in report


def test_the_repository_rows_run_end_to_end(tmp_path: Path) -> None:
    """Ten policies against one, and versions published under wrk: every phase answered, the switch seen."""
    rows = run_harness("repo-1,repo-10,switch-under-load", tmp_path, timeout_s=600)
    runs = {(r["config"], r["workload"], r["concurrency"]): r for r in rows}
    assert {key for key in runs if key[0] == "switch-under-load"} == {
        ("switch-under-load", f"predict:{phase}", 32) for phase in ("before", "during", "after")
    }
    assert {("repo-1", "predict", 32), ("repo-10", "predict", 32)} <= set(runs)
    assert all(r["requests_per_s"] > 0 and r["errors"] == 0 and r["rss_mib"] > 0 for r in runs.values())
    assert runs["switch-under-load", "predict:during", 32]["switch_s"] > 0
    targets = (tmp_path / "RESULTS.md").read_text().split("## Targets")[1]
    assert "memory per extra policy" in targets and "no failed request: 0 failed requests" in targets


def test_a_peer_that_does_not_install_or_run_gets_a_row_saying_why(tmp_path: Path) -> None:
    """Two stand-in peers, fast and without a network: one whose requirements pip rejects, one that
    installs (nothing) and whose server exits. Each gets a row with the reason; `local` is measured."""
    folder = tmp_path / "peers"
    (folder / "litserve").mkdir(parents=True)
    (folder / "litserve" / "requirements.txt").write_text("not a requirement!\n")
    (folder / "bentoml").mkdir()
    (folder / "bentoml" / "requirements.txt").write_text("# nothing to install\n")
    (folder / "bentoml" / "server.py").write_text('raise SystemExit("RuntimeError: no such framework here")\n')
    environment = {"POLICY_SERVER_BENCH_PEERS": str(folder), "POLICY_SERVER_BENCH_VENVS": str(tmp_path / "venvs")}
    rows = run_harness("local,peer-litserve,peer-bentoml", tmp_path / "out", timeout_s=300, environment=environment)
    failures = {r["config"]: r["failure"] for r in rows if r["failure"]}
    assert failures["peer-litserve"].startswith("pip install failed: ") and "not a requirement!" in failures["peer-litserve"]
    assert failures["peer-bentoml"].endswith("RuntimeError: no such framework here")
    assert {r["config"] for r in rows if not r["failure"]} == {"local"}
    report = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "not measured here: pip install failed" in report and "| **ours** (`local`) |" in report
