"""bench/oip.py runs end to end (a second per figure): the server starts with its gRPC port, wrk
and the gRPC client drive it, every load is answered without an error, and its section of
RESULTS.md is written in place, the rest of the file kept. No figure is asserted."""

import json
import subprocess
import sys
from pathlib import Path

from servers import REPO

SECTION = "## Open Inference Protocol (issue 15)"


def test_the_oip_bench_runs_and_replaces_its_section(tmp_path: Path) -> None:
    (tmp_path / "RESULTS.md").write_text(f"# Benchmark results\n\n## Before\n\nkept\n\n{SECTION}\n\nold figures\n\n## After\n\nkept too\n")
    command = [sys.executable, str(REPO / "bench" / "oip.py"), "--duration", "3", "--out", str(tmp_path)]
    subprocess.run(command, check=True, timeout=600, cwd=REPO, capture_output=True)
    figures = json.loads((tmp_path / "results-oip.json").read_text())
    assert len(figures) == 6
    assert all(figure["decisions_per_s"] > 0 and figure["errors"] == 0 for figure in figures), figures
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count(SECTION) == 1 and "old figures" not in text
    assert text.index("## Before") < text.index(SECTION) < text.index("## After")
    assert "kept\n" in text and "kept too" in text
    assert "| gRPC stream, 1 observation per message, 64 unanswered |" in text
