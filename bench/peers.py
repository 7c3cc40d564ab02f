"""The peers (issue 13): servers a user would pick instead of ours, each serving the default example's
TorchScript model in its framework's documented fastest CPU configuration (bench/peers/<peer>/README.md).

Each peer runs from its own virtual environment, made here from its pinned requirements file, so
its dependencies never touch ours. A venv is named by a hash of that file and kept under
~/.cache/policy-server-bench/venvs/ (or POLICY_SERVER_BENCH_VENVS): reruns reuse it. A peer that
does not install yields `Unavailable` with pip's own one-line reason, for the report's row.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Overridable so that the harness's own test can bring peers that fail in known ways, fast.
FOLDER = Path(os.environ.get("POLICY_SERVER_BENCH_PEERS", Path(__file__).resolve().parent / "peers"))
VENVS = Path(os.environ.get("POLICY_SERVER_BENCH_VENVS", Path.home() / ".cache" / "policy-server-bench" / "venvs"))
INSTALL_TIMEOUT_S = 1800


class Unavailable(Exception):
    """The peer cannot be measured here; the message is the report's one-line reason."""


@dataclass(frozen=True)
class Peer:
    name: str  # its folder under bench/peers/, and its configuration `peer-<name>`
    label: str  # the framework, as the report names it
    package: str  # its pinned distribution in the requirements file, for the report's version
    protocol: str  # how its requests look: see `requests`
    pinned: bool = True  # on the server core like ours; Ray's processes need both cores, as ours with Ray do
    note: str = ""


PEERS = (
    Peer(
        "litserve", "LitServe", "litserve", "ours", note="batching (max_batch_size 64, batch_timeout 1 ms), 1 inference worker, fast_queue"
    ),
    Peer(
        "bentoml",
        "BentoML",
        "bentoml",
        "bentoml",
        note="adaptive batching (max_batch_size 64, max_latency_ms 10), 1 worker; a batchable API takes a list: /predict's body is `[{...}]`",
    ),
    Peer(
        "ray_serve",
        "Ray Serve",
        "ray",
        "ours",
        pinned=False,
        note="Serve's HTTP proxy, a FastAPI ingress deployment, @serve.batch (max_batch_size 64, 1 ms), 1 replica; both cores",
    ),
    Peer("kserve", "KServe", "kserve", "kserve-v1", note='ModelServer, 1 worker, its V1 protocol: `{"instances": [...]}` on one route'),
    Peer(
        "pytriton",
        "Triton (PyTriton)",
        "nvidia-pytriton",
        "oip",
        note="dynamic batching (max_batch_size 1024, 100 µs queue delay), 1 instance; the Open Inference Protocol (a [rows, 6] FP32 tensor)",
    ),
)


def requests(protocol: str, observation: dict[str, float], rows: int) -> list[tuple[str, str, Any]]:
    """(workload, path, body) of one observation and of `rows`, as the peer's protocol has them: ours
    where the framework lets us choose, its own where it does not."""
    values = list(observation.values())
    if protocol == "ours":
        return [("predict", "/predict", observation), (f"batch{rows}", "/predict_batch", {"observations": [observation] * rows})]
    if protocol == "bentoml":
        return [("predict", "/predict", [observation]), (f"batch{rows}", "/predict_batch", {"observations": [observation] * rows})]
    if protocol == "kserve-v1":
        path = "/v1/models/mouse:predict"
        return [("predict", path, {"instances": [observation]}), (f"batch{rows}", path, {"instances": [observation] * rows})]
    if protocol == "oip":

        def tensor(count: int) -> dict[str, Any]:
            return {"inputs": [{"name": "observations", "shape": [count, len(values)], "datatype": "FP32", "data": values * count}]}

        return [("predict", "/v2/models/mouse/infer", tensor(1)), (f"batch{rows}", "/v2/models/mouse/infer", tensor(rows))]
    raise ValueError(f"unknown protocol {protocol}")


def version(peer: Peer) -> str:
    """The framework's pinned version, from its requirements file ("?" without one)."""
    pins = requirements(peer.name)
    for line in pins.read_text().splitlines() if pins.exists() else []:
        name, _, pinned = line.partition("==")
        if name.split("[")[0].strip().lower() == peer.package:
            return pinned.strip()
    return "?"


def requirements(peer: str) -> Path:
    return FOLDER / peer / "requirements.txt"


def server_script(peer: str) -> Path:
    return FOLDER / peer / "server.py"


def venv(peer: str) -> Path:
    """Where the peer's venv is: named by its requirements' hash, so a changed pin makes a new one."""
    digest = hashlib.sha256(requirements(peer).read_bytes()).hexdigest()[:12]
    return VENVS / f"{peer}-{digest}"


def python(peer: str) -> Path:
    return venv(peer) / "bin" / "python"


def install(peer: str) -> Path:
    """The peer's venv, made and installed unless an earlier run finished it; its python."""
    target = venv(peer)
    done = target / ".installed"
    if done.exists():
        return python(peer)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(target)], "venv")
    _run([str(python(peer)), "-m", "pip", "install", "--quiet", "-r", str(requirements(peer))], "pip install")
    done.touch()
    return python(peer)


def _run(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise Unavailable(f"{what} did not finish in {INSTALL_TIMEOUT_S} s") from error
    if result.returncode != 0:
        raise Unavailable(f"{what} failed: {reason(result.stderr or result.stdout)}")


def reason(output: str) -> str:
    """The one line that says why: pip's (or Python's) last error line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR") or "Error" in line.split(":")[0]]
    return (errors or lines or ["no output"])[-1][:300]
