"""Virtual environments of their own for clients whose dependencies clash with the server's.

tritonclient's gRPC stubs need protobuf < 7 (the server runs 7), and KServe's and tritonclient's
stubs crash one process that loads both (duplicate `inference.*` symbols): each client gets its
own venv, made once under `.cache/client-venvs/` from pinned requirements, and the tests run the
client in a subprocess of that venv's Python. A venv is made again when its requirements change.
"""

import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENVS = REPO / ".cache" / "client-venvs"
INSTALL_TIMEOUT_S = 900

TRITONCLIENT = ("tritonclient[http,grpc]==2.73.0", "protobuf==6.33.5", "numpy<3")
KSERVE = ("kserve==0.21.0",)


def client_python(name: str, requirements: Sequence[str]) -> Path:
    """The Python of the venv `name` holding `requirements` (made now if missing or stale)."""
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    folder = VENVS / f"{name}-{digest}"
    python = folder / "bin" / "python"
    if not (folder / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        (folder / ".installed").touch()
    return python


def run_client(python: Path, script: str, *args: str, timeout: float = 300) -> Any:
    """Run `script` with `python` and the arguments; its stdout is one JSON document, returned."""
    completed = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"client failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
    return json.loads(completed.stdout)
