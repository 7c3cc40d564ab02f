"""The Open Inference Protocol's figures (issue 15), run by `make bench` after run.py: one server
of the default example (ours, defaults, pinned as run.py pins it) with POLICY_SERVER_GRPC_PORT,
and in the same run, interleaved over run.py's ROUNDS:

- REST /predict at c=1 and c=32 (wrk): the baselines;
- OIP REST `infer`, 1,024 observations per request, binary tensors both ways (wrk);
- gRPC: a stream of one observation per message (pipelined, and in lock-step), and unary
  ModelInfer at c=32, from raw grpc in tritonclient's venv (bench/oip_client.py).

Writes bench/results-oip.json and the section "Open Inference Protocol (issue 15)" of
bench/RESULTS.md (replaced in place, the rest of the file kept).

    python bench/oip.py --duration 6
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import run  # bench/run.py: this script's folder is first on sys.path

sys.path.insert(0, str(run.REPO / "tests"))
from client_venvs import TRITONCLIENT, client_python

SECTION = "## Open Inference Protocol (issue 15)"
ROWS = run.BATCH_ROWS
STREAM_WINDOW = 64  # messages a stream client keeps unanswered (the server decides 64 at once)
UNARY_CONCURRENCY = 32
TARGET_OBS_PER_S = 1_000_000


@dataclass(frozen=True)
class Figure:
    name: str
    decisions_per_s: float  # observations per second for the 1,024-row requests
    p50_ms: float | None
    errors: int


def binary_infer_body() -> tuple[bytes, int]:
    """An OIP infer of ROWS observations, one FP32 [ROWS] tensor per field, all raw bytes, the
    outputs asked for raw too; and the length of its JSON header."""
    fields = list(run.MOUSE_OBSERVATION.items())
    blobs = [np.full(ROWS, value, dtype=np.float32).tobytes() for _, value in fields]
    inputs = [
        {"name": name, "shape": [ROWS], "datatype": "FP32", "parameters": {"binary_data_size": len(blob)}}
        for (name, _), blob in zip(fields, blobs, strict=True)
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(blobs), len(header)


def wrk_binary(url: str, duration: int, scratch: Path) -> dict[str, float]:
    body, header_length = binary_infer_body()
    (scratch / "infer.bin").write_bytes(body)
    script = scratch / "infer.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"\n'
        f'wrk.headers["access-token"] = "{run.API_KEY}"\n'
        f'local f = io.open("{scratch / "infer.bin"}", "rb"); wrk.body = f:read("*a"); f:close()\n'
    )
    command = [
        *run.WRK_CORE,
        "wrk",
        "-t1",
        "-c1",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(script),
        f"{url}/v2/models/mouse_and_cheese/infer",
    ]
    return run.parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout)


def grpc_load(python: Path, mode: str, address: str, duration: int, *args: str) -> dict[str, float]:
    client = Path(__file__).with_name("oip_client.py")
    command = [*run.WRK_CORE, str(python), str(client), mode, address, str(duration), *args]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout)


def measure(duration: int, scratch: Path) -> list[Figure]:
    python = client_python("tritonclient", TRITONCLIENT)
    grpc_port = run.free_port()
    config = run.Config("oip", run.hardened(run.uvicorn("app:app")), "mouse", env={"POLICY_SERVER_GRPC_PORT": str(grpc_port)})
    predict = run.Workload("predict", "/predict", run.MOUSE_OBSERVATION, 1)
    address = f"127.0.0.1:{grpc_port}"
    per_round = max(1, duration // run.ROUNDS)
    samples: dict[str, list[Figure]] = {}
    with run.server(config, run.MOUSE, scratch / "cache") as (url, _, _):

        def rest(c: int) -> Figure:
            result = run.wrk(url, predict, c, per_round, scratch)
            return Figure(f"REST /predict, c={c}", result["requests_per_s"], result["p50_ms"], int(result["errors"]))

        def binary() -> Figure:
            result = wrk_binary(url, per_round, scratch)
            return Figure(
                f"OIP REST infer, {ROWS} observations, binary", result["requests_per_s"] * ROWS, result["p50_ms"], int(result["errors"])
            )

        def stream() -> Figure:
            result = grpc_load(python, "stream", address, per_round, str(STREAM_WINDOW))
            return Figure(
                f"gRPC stream, 1 observation per message, {STREAM_WINDOW} unanswered",
                result["decisions_per_s"],
                None,
                int(result["errors"]),
            )

        def lockstep() -> Figure:
            result = grpc_load(python, "lockstep", address, per_round)
            return Figure(
                "gRPC stream, 1 observation per message, lock-step", result["decisions_per_s"], result["p50_ms"], int(result["errors"])
            )

        def unary() -> Figure:
            result = grpc_load(python, "unary", address, per_round, str(UNARY_CONCURRENCY))
            return Figure(
                f"gRPC unary ModelInfer, c={UNARY_CONCURRENCY}", result["decisions_per_s"], result["p50_ms"], int(result["errors"])
            )

        for _ in range(run.ROUNDS):
            for measurement in (lambda: rest(1), lambda: rest(32), binary, stream, lockstep, unary):
                figure = measurement()
                samples.setdefault(figure.name, []).append(figure)
    return [_median(rounds) for rounds in samples.values()]


def _median(rounds: list[Figure]) -> Figure:
    middle = sorted(rounds, key=lambda figure: figure.decisions_per_s)[len(rounds) // 2]
    return Figure(middle.name, middle.decisions_per_s, middle.p50_ms, sum(figure.errors for figure in rounds))


def section(figures: list[Figure], duration: int, load: tuple[float, float]) -> str:
    by_name = {figure.name: figure for figure in figures}
    rest_c1 = next(f for f in figures if f.name == "REST /predict, c=1")
    binary = next(f for f in figures if f.name.startswith("OIP REST infer"))
    stream = next(f for f in figures if f.name.startswith("gRPC stream") and "unanswered" in f.name)
    lines = [
        SECTION,
        "",
        f"Measured {datetime.date.today().isoformat()} by `bench/oip.py` ({duration} s per figure, the median of {run.ROUNDS} "
        "interleaved rounds), one server of the default example (ours, defaults) pinned on one core, "
        "the load on the other: wrk for REST, raw grpc (tritonclient's stubs, requests built once) for gRPC. "
        f"The machine's load average (1 min) was {load[0]:.1f} before and {load[1]:.1f} after: compare the rows "
        "with each other, not with the tables above when it is well over 2.",
        "",
        "| load | decisions/s | p50 ms | errors |",
        "| --- | ---: | ---: | ---: |",
    ]
    for figure in by_name.values():
        p50 = f"{figure.p50_ms:.3f}" if figure.p50_ms is not None else "-"
        lines.append(f"| {figure.name} | {figure.decisions_per_s:,.0f} | {p50} | {figure.errors} |")
    lines += [
        "",
        f"- OIP binary infer ({ROWS} observations) ≥ {TARGET_OBS_PER_S:,} obs/s: {binary.decisions_per_s:,.0f} — "
        + ("met" if binary.decisions_per_s >= TARGET_OBS_PER_S else "**missed**"),
        f"- gRPC stream ≥ REST /predict at c=1: {stream.decisions_per_s:,.0f} against {rest_c1.decisions_per_s:,.0f} decisions/s — "
        + ("met" if stream.decisions_per_s >= rest_c1.decisions_per_s else "**missed**"),
        "",
    ]
    return "\n".join(lines)


def write_section(results: Path, text: str) -> None:
    """`text` in place of the file's section of that name (or at its end)."""
    current = results.read_text() if results.exists() else ""
    start = current.find(SECTION)
    if start < 0:
        results.write_text(current.rstrip("\n") + "\n\n" + text)
        return
    following = current.find("\n## ", start + len(SECTION))
    rest = current[following + 1 :] if following >= 0 else ""
    results.write_text(current[:start] + text + ("\n" + rest if rest else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per figure, over its rounds")
    parser.add_argument("--out", type=Path, default=run.BENCH)
    args = parser.parse_args()
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="policy-bench-oip-") as scratch:
        figures = measure(args.duration, Path(scratch))
    load = before, os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results-oip.json").write_text(json.dumps([figure.__dict__ for figure in figures], indent=1) + "\n")
    text = section(figures, args.duration, load)
    write_section(args.out / "RESULTS.md", text)
    print(text)


if __name__ == "__main__":
    main()
