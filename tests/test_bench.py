"""The benchmark harness runs end to end (a second per run): servers start, wrk drives them, the
report is written. No figure is asserted: speed is measured by `make bench`, not by tests."""

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from servers import REPO

sys.path.insert(0, str(REPO / "bench"))
import run  # bench/run.py: the workloads and the wrk command, as the harness builds them


def run_harness(
    configs: str, out: Path, timeout_s: float, environment: dict[str, str] | None = None, rounds: int = run.ROUNDS
) -> list[dict[str, Any]]:
    """`bench/run.py` for `configs`, `rounds` runs of a second per figure, into `out`: its results.json rows."""
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--duration", "1", "--configs", configs, "--no-sweep", "--out", str(out)]
    command += ["--rounds", str(rounds)]
    subprocess.run(command, check=True, timeout=timeout_s, cwd=REPO, capture_output=True, env=os.environ | (environment or {}))
    return json.loads((out / "results.json").read_text())


def test_harness_runs_end_to_end(tmp_path: Path) -> None:
    """With logging on beside off: every request of `local-experience` logged (rows per request from
    its /info), and compared with `local` round by round."""
    configs = ("reference", "local", "local-experience")
    runs = run_harness(",".join(configs), tmp_path, timeout_s=300, rounds=2)
    assert {(r["config"], r["workload"], r["concurrency"]) for r in runs} == {
        (config, "predict", c) for config in configs for c in (1, 32)
    } | {(config, "batch1024", 1) for config in configs}
    assert all(r["requests_per_s"] > 0 and r["rss_mib"] > 0 for r in runs)
    # The log refuses steps (503) beyond max_pending_rows a flush interval: 200,000 rows a second,
    # which a fast machine's 1,024-row batches can exceed. Every other run answers everything.
    assert all(r["errors"] == 0 for r in runs if (r["config"], r["workload"]) != ("local-experience", "batch1024"))
    logged = {(r["workload"], r["concurrency"]): r["logged_per_request"] for r in runs if r["config"] == "local-experience"}
    # per request answered, a little over its rows: wrk does not count the answers in flight when it stops
    assert 1 <= logged["predict", 1] < 1.1 and 1 <= logged["predict", 32] < 1.1 and 1024 <= logged["batch1024", 1] < 1.1 * 1024
    assert all(r["logged_per_request"] is None for r in runs if r["config"] != "local-experience")
    assert all(r["rounds"] == 2 for r in runs)
    assert all((r["paired_ratio"] is not None) == (r["config"] == "local-experience") for r in runs)
    assert all(0 < r["paired_ratio"] < 10 for r in runs if r["config"] == "local-experience")
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| local | predict | 32 |" in report and "## Targets" in report
    assert "/predict logging on ≥ 0.9× logging off at c=32" in report and "## Experience logging" in report


class Recorder(BaseHTTPRequestHandler):
    """Answers every POST with `{}`, keeping the connection, and counts the paths asked for."""

    protocol_version = "HTTP/1.1"
    paths: ClassVar[Counter[str]] = Counter()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.paths[self.path] += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_the_episode_requests_name_one_episode_per_connection(tmp_path: Path) -> None:
    """wrk with the harness's episode script, 3 connections: episodes c0, c1 and c2, each asked for many times."""
    recorder = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    try:
        (predict, _) = run.workloads("mouse", episodes=True)
        url = f"http://127.0.0.1:{recorder.server_address[1]}"
        subprocess.run(run.wrk_command(url, predict, 3, 1, tmp_path), check=True, capture_output=True, timeout=60)
    finally:
        recorder.shutdown()
    assert set(Recorder.paths) == {f"/predict?episode_id=c{n}" for n in range(3)}
    assert min(Recorder.paths.values()) > 10


def test_the_batch_names_one_episode_of_distinct_agents() -> None:
    (_, batch) = run.workloads("mouse", episodes=True)
    observations = batch.body["observations"]  # type: ignore[index]
    assert batch.episodes and len({observation["agent_id"] for observation in observations}) == len(observations) == run.BATCH_ROWS
    assert all("agent_id" not in observation for observation in run.workloads("mouse")[1].body["observations"])  # type: ignore[index]


def test_the_writer_script_reads_back_every_row(tmp_path: Path) -> None:
    """bench/experience_writer.py on a tiny budget: both shapes written, read back (the script fails if not), reported."""
    command = [sys.executable, str(REPO / "bench" / "experience_writer.py"), "--seconds", "0.3", "--out", str(tmp_path)]
    subprocess.run(command, check=True, timeout=120, cwd=REPO, capture_output=True)
    shapes = {shape["name"]: shape for shape in json.loads((tmp_path / "experience_writer.json").read_text())}
    assert set(shapes) == {"batch1024", "single"}
    assert shapes["batch1024"]["rows"] == 1024 * shapes["batch1024"]["pieces"] > 0
    assert shapes["single"]["rows"] == shapes["single"]["pieces"] > 0
    assert all(s["written_rows_per_s"] > 0 and s["files"] >= 1 and s["bytes_per_row"] > 0 for s in shapes.values())


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
