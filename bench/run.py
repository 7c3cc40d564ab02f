"""The benchmark harness (`make bench`): every configuration as a real server on 127.0.0.1, driven
by wrk, reported as ratios to a plain FastAPI server measured in the same run.

Each server starts as a subprocess; the harness waits for /ready (that wait is "time to ready"),
runs each workload with wrk for a fixed duration, reads the whole process tree's RSS, and stops
it. Results go to bench/results.json, bench/RESULTS.md and assets/bench.png.

    python bench/run.py                      # everything, 10 s per run
    python bench/run.py --duration 2 --configs reference,local --no-sweep --out /tmp/b
    python bench/run.py --duration 6 --configs repo-1,repo-10,switch-under-load --no-sweep --out /tmp/b
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import experience_writer  # bench/experience_writer.py, as peers
import httpx
import peers  # bench/peers.py: this script's folder is first on sys.path
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

MOUSE = REPO / "examples" / "mouse_and_cheese"
MOUSE_OBSERVATION = {"mouse_row": 0, "mouse_col": 0, "mouse_row_distance": 3, "mouse_col_distance": 2, "cheese_row": 3, "cheese_col": 2}
API_KEY = "1234567asdfgh"
BATCH_ROWS = 1024
SWEEP = (1, 4, 16, 32, 64)
ROUNDS = 3  # each figure is the median of this many runs of duration/ROUNDS seconds
# On two cores, the scheduler sometimes puts wrk and a one-threaded server on the same core, and
# c=1 latency then jumps by ~50 % from run to run. So wrk runs on the last core, and a pinned
# server on the others.
CORES = os.cpu_count() or 1
WRK_CORE = [] if CORES < 2 else ["taskset", "-c", str(CORES - 1)]
SERVER_CORES = [] if CORES < 2 else ["taskset", "-c", f"0-{CORES - 2}"]
SWEPT = ("reference", "local", "local-no-batching", "ray", "seed-ray", "raw-asgi")  # the plot's lines
REPOSITORY_SIZE = 10  # policies in the `repo-10` configuration
SWITCHED = "mouse_and_cheese"  # the one policy of `switch-under-load`, as its schema names it
SWITCH_PHASES = ("before", "during", "after")
SWITCH_CONCURRENCY = 32
SWITCH_MARGIN_S = 1.0  # the "during" run starts at least this long before the rename and ends this long after the switch
SWITCH_WATCH_S = 2.0  # the watcher's default period, set explicitly: `switch_lead_s` staggers the renames over it
SWITCH_TIMEOUT_S = 60


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    body: object  # posted as JSON
    rows: int  # observations per request
    episodes: bool = False  # each request names an episode: ?episode_id=c<k>, k taking each connection's number in turn


@dataclass
class Config:
    name: str
    command: Callable[[int], list[str]]
    policy: str  # which prepared policy folder it serves ("mouse", "mlp24", ...)
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    cold_start: bool = False  # also time a first start, before the model's trace is cached
    pinned: bool = True  # the server on its own core, away from wrk's (Ray needs both: not pinned)
    switch: bool = False  # measured by `measure_switch`: versions published under load, not the usual plan
    levels: tuple[int, ...] = ()  # /predict's concurrencies, when not those of the sweep (or c=1 and c=32)
    peer: str = ""  # a peer (bench/peers.py): run from its own venv, ready at its first 200 answer to requests[0]
    requests: tuple[Workload, ...] = ()  # its own routes and bodies, in place of `workloads(policy)`
    experience: bool = False  # logs its decisions (into a temporary dir), and its requests name episodes


@dataclass
class Run:
    config: str
    workload: str
    concurrency: int
    requests_per_s: float
    observations_per_s: float
    p50_ms: float
    p99_ms: float
    rss_mib: float
    ready_s: float
    errors: int
    cold_ready_s: float | None = None
    switch_s: float | None = None  # from a version's rename into models/ to its being active (the switch rows)
    failure: str | None = None  # a peer that did not install or run here: why (its only row, no figures)
    logged_per_request: float | None = None  # rows the experience log took per request answered 2xx (logging configurations)
    cpu_us_per_request: float | None = None  # the server's CPU (all its processes and threads) over the requests answered
    rounds: int = ROUNDS  # the wrk runs this row is the median of
    paired_ratio: float | None = None  # logging on: the median over the rounds of its req/s ÷ logging off's in the same round


# --- policies to serve ------------------------------------------------------------------------


def prepare_policies(root: Path) -> dict[str, Path]:
    """The default example as shipped (.pt2), as TorchScript and as ONNX, and a 24→64→64→4 MLP."""
    sys.path.insert(0, str(REPO))
    from policy_server.onnx_export import export_onnx  # the product's own export, as a user would run it

    folders = {}
    mouse_program = torch.export.load(MOUSE / "models" / "model.pt2")
    mouse_schema = (MOUSE / "schema.yaml").read_text()
    folders["mouse"] = _policy(root / "mouse", mouse_schema, pt2=MOUSE / "models" / "model.pt2")
    folders["mouse_ts"] = _policy(root / "mouse_ts", mouse_schema, module=mouse_program.module(), width=6)
    folders["mouse_onnx"] = _policy(root / "mouse_onnx", mouse_schema)
    export_onnx(MOUSE / "models" / "model.pt2", folders["mouse_onnx"] / "models" / "model.onnx", 6)
    for name, serving in {
        "mouse_nobatch": "{max_batch_size: 1}",
        "mouse_ray": "{backend: ray}",
        "mouse_ray_nobatch": "{backend: ray, max_batch_size: 1}",
        "mouse_ray_2": "{backend: ray, replicas: 2}",
    }.items():
        folders[name] = _policy(root / name, f"{mouse_schema}serving: {serving}\n", pt2=MOUSE / "models" / "model.pt2")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)
    ).eval()
    fields = "".join(f"  x{i}: {{type: float}}\n" for i in range(24))
    mlp_schema = f"parameters: {{discrete: true, api_key: '{API_KEY}'}}\nobservations:\n{fields}"
    folders["mlp24"] = _policy(root / "mlp24", mlp_schema, module=mlp, width=24, export=True)
    folders["mlp24_ts"] = _policy(root / "mlp24_ts", mlp_schema, module=mlp, width=24)
    for count in (1, REPOSITORY_SIZE):
        folders[f"mouse_repo_{count}"] = _mouse_repository(root / f"mouse_repo_{count}", mouse_schema, count)
    folders["mouse_versions"] = root / "mouse_versions"
    _policy(folders["mouse_versions"] / SWITCHED, mouse_schema)
    publish(folders["mouse_versions"] / SWITCHED, 1, root / "staging")
    return folders


def repository_policy(index: int) -> str:
    return f"mouse_{index:02}"


def _mouse_repository(root: Path, schema: str, count: int) -> Path:
    """`count` copies of the default example, each under its own name and key; the first keeps the example's key."""
    for index in range(1, count + 1):
        name, key = repository_policy(index), API_KEY if index == 1 else f"{API_KEY}-{index}"
        renamed = re.sub(r"^name: .*$", f"name: {name}", schema, count=1, flags=re.MULTILINE).replace(f'"{API_KEY}"', f'"{key}"')
        _policy(root / name, renamed, pt2=MOUSE / "models" / "model.pt2")
    return root


def publish(policy: Path, version: int, staging: Path) -> float:
    """The default example's model as `version` of `policy`, published as the README says: written
    elsewhere, then renamed into models/ in one step. Returns the moment of the rename (time.time())."""
    built = staging / f"{policy.name}-{version}"
    built.mkdir(parents=True)
    shutil.copy(MOUSE / "models" / "model.pt2", built / "model.pt2")
    renamed_at = time.time()
    os.rename(built, policy / "models" / str(version))
    return renamed_at


def _policy(
    folder: Path, schema: str, pt2: Path | None = None, module: torch.nn.Module | None = None, width: int = 0, export: bool = False
) -> Path:
    (folder / "models").mkdir(parents=True)
    (folder / "schema.yaml").write_text(schema)
    if pt2 is not None:
        shutil.copy(pt2, folder / "models" / "model.pt2")
    elif export and module is not None:
        program = torch.export.export(module, (torch.zeros(2, width),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, folder / "models" / "model.pt2")
    elif module is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(module, (torch.zeros(3, width),)), folder / "models" / "model.pt")
    return folder


# --- configurations ---------------------------------------------------------------------------


def uvicorn(app: str) -> Callable[[int], list[str]]:
    return lambda port: [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]


# Ray on loopback (its default address is the machine's external interface), on both cores.
RAY_ENV = {"POLICY_SERVER_RAY_NODE_IP": "127.0.0.2", "POLICY_SERVER_RAY_CPUS": "2"}


def hardened(command: Callable[[int], list[str]]) -> Callable[[int], list[str]]:
    """What `generate.py serve` runs: uvicorn with our HTTP protocol (request deadlines, connection bound)."""
    return lambda port: [*command(port), "--http", "policy_server.protocol:HardenedHTTP"]


def peer_config(peer: peers.Peer) -> Config:
    """A peer as a configuration: its server script from its venv, its own requests, the TorchScript model."""
    requests = tuple(
        Workload(name, path, body, rows)
        for (name, path, body), rows in zip(peers.requests(peer.protocol, MOUSE_OBSERVATION, BATCH_ROWS), (1, BATCH_ROWS), strict=True)
    )
    return Config(
        f"peer-{peer.name}",
        lambda port: [str(peers.python(peer.name)), str(peers.server_script(peer.name)), str(port)],
        "mouse_ts",
        note=f"{peer.label} {peers.version(peer)}: {peer.note}",
        pinned=peer.pinned,
        peer=peer.name,
        requests=requests,
    )


def configurations() -> list[Config]:
    ours = hardened(uvicorn("app:app"))
    return [
        Config("reference", uvicorn("reference_server:app"), "mouse_ts", note="plain FastAPI + the TorchScript model, no validation"),
        Config("raw-asgi", uvicorn("raw_asgi:app"), "mouse", note="bare ASGI, fixed answer: the HTTP ceiling"),
        Config(
            "orjson-script",
            uvicorn("orjson_server:app"),
            "mouse_ts",
            note="hand-written FastAPI: the raw body read with orjson, the TorchScript model, no validation",
        ),
        Config("local", ours, "mouse", note="ours, defaults (.pt2, batching, metrics)", cold_start=True),
        Config("local-torchscript", ours, "mouse_ts", note="ours, the model as TorchScript"),
        Config("local-onnx", ours, "mouse_onnx", note="ours, the model as ONNX (onnxruntime)"),
        Config("local-no-batching", ours, "mouse_nobatch", note="ours, max_batch_size 1"),
        Config("local-no-metrics", ours, "mouse", {"POLICY_SERVER_METRICS": "off"}, note="ours, POLICY_SERVER_METRICS=off"),
        Config(
            "local-experience",
            ours,
            "mouse",
            note="ours, defaults, logging experience (POLICY_SERVER_EXPERIENCE_DIR); every request names an episode",
            experience=True,
        ),
        Config("reference-mlp24", uvicorn("reference_server:app"), "mlp24_ts", note="reference, 24→64→64→4 MLP"),
        Config("local-mlp24", ours, "mlp24", note="ours, 24→64→64→4 MLP (.pt2)", cold_start=True),
        Config(
            "repo-1",
            ours,
            "mouse_repo_1",
            {"POLICY_SERVER_DEFAULT": repository_policy(1)},
            note="ours, a repository of one policy (a copy of the default example)",
            cold_start=True,
        ),
        Config(
            "repo-10",
            ours,
            "mouse_repo_10",
            {"POLICY_SERVER_DEFAULT": repository_policy(1)},
            note=f"ours, a repository of {REPOSITORY_SIZE} copies of the default example, each its own name and key; "
            "the root routes serve the first",
        ),
        Config(
            "seed-ray",
            uvicorn("seed_ray_server:app"),
            "mouse_ts",
            note="the seed design: FastAPI → DeploymentHandle → replica, no batching (TorchScript model)",
            pinned=False,
        ),
        Config("ray", ours, "mouse_ray", RAY_ENV, note="ours, backend ray: 1 replica, batching (max_batch_size 64)", pinned=False),
        Config("ray-no-batching", ours, "mouse_ray_nobatch", RAY_ENV, note="ours, backend ray, max_batch_size 1", pinned=False),
        Config(
            "ray-2-replicas",
            ours,
            "mouse_ray_2",
            RAY_ENV,
            note="ours, backend ray, 2 replicas (one per core)",
            pinned=False,
            levels=(1, 32, 64),  # against `ray` at c=64
        ),
        Config(
            "switch-under-load",
            ours,
            "mouse_versions",
            {"POLICY_SERVER_WATCH": f"{SWITCH_WATCH_S:g}"},
            note=f"ours, a repository of one policy (the default example as models/1/); /predict at c={SWITCH_CONCURRENCY} "
            "before, during and after the same model is published as the next version",
            switch=True,
        ),
        *(peer_config(peer) for peer in peers.PEERS),
    ]


def workloads(policy: str, episodes: bool = False) -> list[Workload]:
    """/predict and /predict_batch; with `episodes`, naming them (a batch: the query's episode, each
    observation its own agent)."""
    observation = MOUSE_OBSERVATION if policy.startswith("mouse") else {f"x{i}": 0.1 * i for i in range(24)}
    batch = [observation | {"agent_id": f"a{i}"} for i in range(BATCH_ROWS)] if episodes else [observation] * BATCH_ROWS
    return [
        Workload("predict", "/predict", observation, 1, episodes),
        Workload(f"batch{BATCH_ROWS}", "/predict_batch", {"observations": batch}, BATCH_ROWS, episodes),
    ]


# --- running ----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(config: Config, folder: Path, cache: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], float]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
    model = next(folder.rglob("model.*"))  # for the reference servers: the policy's one model file
    env |= {
        "PYTHONPATH": f"{REPO}{os.pathsep}{BENCH}",
        "POLICY_SERVER_DIR": str(folder),
        "BENCH_MODEL": str(model),
        "POLICY_SERVER_SDKS": "on-request",
        "POLICY_SERVER_CACHE_DIR": str(cache),
    }
    env |= {"POLICY_SERVER_RAY_METRICS_PORT": str(free_port())} | config.env
    started = time.perf_counter()
    # stderr to a file, not a pipe: a peer logs more than a pipe holds, and would stall on a full one.
    with (
        tempfile.TemporaryDirectory(prefix="rt-", dir="/tmp") as ray_tmp,  # short: Ray's socket paths must fit
        tempfile.TemporaryDirectory(prefix="experience-", dir=cache.parent) as experience,
        tempfile.TemporaryFile() as log,
    ):
        if config.experience:
            env["POLICY_SERVER_EXPERIENCE_DIR"] = experience
        process = subprocess.Popen(
            (SERVER_CORES if config.pinned else []) + config.command(port),
            cwd=REPO,
            env=env | {"RAY_TMPDIR": ray_tmp},
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            ready_s = _wait_ready(url, process, log, config.requests[0] if config.requests else None) - started
            yield url, process, ready_s
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server alone, so that one with Ray shuts Ray down in order; then whatever
    is left of its process group goes."""
    process.terminate()
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Any, first: Workload | None) -> float:
    """When /ready answers 200; for a peer (no /ready), when `first` is first answered 200: its time to first answer."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode(errors='replace')}")
        try:
            answer = httpx.get(f"{url}/ready", timeout=1) if first is None else httpx.post(url + first.path, json=first.body, timeout=5)
            if answer.status_code == 200:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError("server not ready in 120 s")


def wrk(url: str, workload: Workload, concurrency: int, duration: int, scratch: Path) -> dict[str, float]:
    """One wrk run; its own cost is one thread of the two cores, the same for every configuration."""
    command = wrk_command(url, workload, concurrency, duration, scratch)
    return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60).stdout)


def wrk_command(url: str, workload: Workload, concurrency: int, duration: int, scratch: Path) -> list[str]:
    body = scratch / f"{workload.name}.json"
    body.write_text(json.dumps(workload.body))
    script = scratch / f"{workload.name}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["access-token"] = "{API_KEY}"\n'
        f'local f = io.open("{body}", "r"); wrk.body = f:read("*a"); f:close()\n' + (episodes_lua(concurrency) if workload.episodes else "")
    )
    return [*WRK_CORE, "wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--latency", "-s", str(script), url + workload.path]


def episodes_lua(connections: int) -> str:
    """Requests naming `connections` episodes, c0, c1, ..., in turn. wrk's Lua sees no connection,
    but each connection has one request in flight: each episode gets every `connections`-th request."""
    return (
        "local requests, n = {}, 0\n"
        "function init(args)\n"
        f'  for i = 0, {connections - 1} do requests[i + 1] = wrk.format(nil, wrk.path .. "?episode_id=c" .. i) end\n'
        "end\n"
        "function request()\n  n = n % #requests + 1\n  return requests[n]\nend\n"
    )


def logged_rows(url: str) -> int:
    """Rows the server's experience log has taken so far, written or pending (its /info)."""
    state = httpx.get(f"{url}/info", headers={"access-token": API_KEY}, timeout=10).json()["experience"]
    return int(state["written_rows"]) + int(state["pending_rows"])


def parse_wrk(output: str) -> dict[str, float]:
    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if match is None:
            raise ValueError(f"no {percent}% latency in wrk's output:\n{output}")
        return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    answered = re.search(r"^\s+(\d+) requests in ", output, re.MULTILINE)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    count = int(errors.group(1)) if errors else 0
    count += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return {
        "requests_per_s": float(rate.group(1)) if rate else 0.0,
        "requests": int(answered.group(1)) if answered else 0,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": count,
    }


def _tree(pid: int) -> Iterator[int]:
    """A process and all its descendants, from /proc (those gone meanwhile are skipped)."""
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            children = [int(child) for task in Path(f"/proc/{current}/task").iterdir() for child in (task / "children").read_text().split()]
        except OSError:
            continue
        yield current
        stack.extend(children)


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants."""
    total = 0
    for current in _tree(pid):
        try:
            total += int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{current}/status").read_text()).group(1))  # type: ignore[union-attr]
        except (OSError, AttributeError):
            continue
    return total / 1024


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process and its descendants have used so far."""
    total = 0
    for current in _tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _CLOCK_TICKS


def plan(config: Config, concurrencies: tuple[int, ...]) -> list[tuple[Workload, int]]:
    """The runs of a configuration: /predict at each concurrency, /predict_batch at c=1."""
    runs = []
    for workload in config.requests or workloads(config.policy, episodes=config.experience):
        if workload.rows > 1 and config.name == "raw-asgi":
            continue
        runs += [(workload, c) for c in (concurrencies if workload.rows == 1 else (1,))]
    return runs


@contextmanager
def started(config: Config, folder: Path, scratch: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], float, float | None]]:
    """The server, ready; with `cold_start`, after a first start that is timed and stopped."""
    cold_ready_s = None
    if config.cold_start:
        with server(config, folder, scratch / "cache") as (_, _, cold_ready_s):
            pass
    with server(config, folder, scratch / "cache") as (url, process, ready_s):
        yield url, process, ready_s, cold_ready_s


def available(configs: list[Config], folders: dict[str, Path], scratch: Path) -> tuple[list[Config], list[Run]]:
    """The configurations to measure, and a row saying why for each peer that does not install or
    answer here. Each peer is installed into its venv (once: cached) and started once, untimed, so
    its measured start, like ours, finds the files it reads already cached."""
    kept, failed = [], []
    for config in configs:
        if config.peer:
            try:
                peers.install(config.peer)
                with server(config, folders[config.policy], scratch / "cache"):
                    pass
            except (peers.Unavailable, RuntimeError) as error:
                reason = peers.reason(str(error)) if isinstance(error, RuntimeError) else str(error)
                print(f"{config.name}: not measured: {reason}", flush=True)
                failed.append(Run(config.name, "-", 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, failure=reason))
                continue
        kept.append(config)
    return kept, failed


def measure(
    group: list[Config], folders: dict[str, Path], duration: int, scratch: Path, concurrencies: tuple[int, ...], rounds: int = ROUNDS
) -> list[Run]:
    """Start every server of the group, then drive them in turns: each run is repeated `rounds`
    times per server (duration/rounds seconds each), interleaved across the servers, and reported
    as the median. This machine's speed drifts within minutes; interleaving gives every server the
    same fast and slow moments, and logging on is also compared with off round by round."""
    samples: dict[tuple[str, str, int], list[Run]] = {}
    with ExitStack() as stack:
        servers = [(config, stack.enter_context(started(config, folders[config.policy], scratch))) for config in group]
        keys = list(dict.fromkeys((w.name, c) for config, _ in servers for w, c in plan(config, levels_of(config, concurrencies))))
        keys.sort(key=lambda key: key[1])  # low concurrency first: an overloaded server may not recover at once
        for name, concurrency in keys:
            for _ in range(rounds):
                for config, (url, process, ready_s, cold_ready_s) in servers:
                    todo = [w for w, c in plan(config, levels_of(config, concurrencies)) if (w.name, c) == (name, concurrency)]
                    if not todo:
                        continue
                    logged = logged_rows(url) if config.experience else 0
                    cpu_before = tree_cpu_s(process.pid)
                    result = wrk(url, todo[0], concurrency, max(1, duration // rounds), scratch)
                    run = _run(config, todo[0], concurrency, result, process, ready_s, cold_ready_s)
                    cpu_us = 1e6 * (tree_cpu_s(process.pid) - cpu_before) / max(1, result["requests"])
                    run = replace(run, cpu_us_per_request=cpu_us, rounds=rounds)
                    print(f"{'':20} server CPU {run.cpu_us_per_request:.1f} µs per request", flush=True)
                    if config.experience:
                        answered = result["requests"] - result["errors"]  # a refused request (503: the log is behind) logs nothing
                        run = replace(run, logged_per_request=(logged_rows(url) - logged) / max(1, answered))
                    samples.setdefault((config.name, name, concurrency), []).append(run)
    order = [(config.name, w.name, c) for config in group for w, c in plan(config, levels_of(config, concurrencies))]
    return [replace(_median(samples[key]), paired_ratio=_paired_ratio(samples, key)) for key in order]


def _paired_ratio(samples: dict[tuple[str, str, int], list[Run]], key: tuple[str, str, int]) -> float | None:
    """Logging on's throughput ÷ logging off's, round by round (the two ran seconds apart), the median."""
    off = samples.get((LOGGING_OFF, *key[1:]))
    if key[0] != LOGGING_ON or not off:
        return None
    return statistics.median(on.requests_per_s / max(base.requests_per_s, 1e-9) for on, base in zip(samples[key], off, strict=True))


def _run(
    config: Config,
    workload: Workload,
    concurrency: int,
    result: dict[str, float],
    process: subprocess.Popen[bytes],
    ready_s: float,
    cold_ready_s: float | None,
    switch_s: float | None = None,
) -> Run:
    """One wrk run's figures, with the server's RSS read now."""
    run = Run(
        config=config.name,
        workload=workload.name,
        concurrency=concurrency,
        requests_per_s=result["requests_per_s"],
        observations_per_s=result["requests_per_s"] * workload.rows,
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        rss_mib=tree_rss_mib(process.pid),
        ready_s=ready_s,
        cold_ready_s=cold_ready_s,
        errors=int(result["errors"]),
        switch_s=switch_s,
    )
    switched = f"  rename → active {switch_s:.2f} s" if switch_s is not None else ""
    print(
        f"{config.name:20} {workload.name:10} c={concurrency:<3} {run.requests_per_s:9.0f} req/s  p50 {run.p50_ms:.3f} ms{switched}",
        flush=True,
    )
    return run


def measure_switch(config: Config, folder: Path, duration: int, scratch: Path) -> list[Run]:
    """Versions published under load. One server; each of the ROUNDS rounds publishes the next
    version (2, 3, ...) and runs wrk three times back to back: before, during (from `switch_lead_s`
    before the rename to SWITCH_MARGIN_S after /policies shows the new version active) and after.
    Each phase is reported as the median of its rounds, as `predict:before`, `predict:during`, ..."""
    predict = workloads(config.policy)[0]
    phases = {phase: replace(predict, name=f"{predict.name}:{phase}") for phase in SWITCH_PHASES}
    samples: dict[str, list[Run]] = {phase: [] for phase in SWITCH_PHASES}
    run_s = max(1, duration // ROUNDS)
    with started(config, folder, scratch) as (url, process, ready_s, cold_ready_s):

        def record(phase: str, result: dict[str, float], switch_s: float | None = None) -> None:
            samples[phase].append(_run(config, phases[phase], SWITCH_CONCURRENCY, result, process, ready_s, cold_ready_s, switch_s))

        for round_index, version in enumerate(range(2, 2 + ROUNDS)):
            record("before", wrk(url, phases["before"], SWITCH_CONCURRENCY, run_s, scratch))
            record("during", *publish_under_load(url, phases["during"], folder / SWITCHED, version, switch_lead_s(round_index), scratch))
            record("after", wrk(url, phases["after"], SWITCH_CONCURRENCY, run_s, scratch))
            _check_answered_by(url, predict, str(version))
    return [_median(samples[phase]) for phase in SWITCH_PHASES]


def switch_lead_s(round_index: int) -> float:
    """How far into a round's "during" run its version is renamed: SWITCH_MARGIN_S, plus a step of
    the watcher's period per round. Runs of whole seconds would otherwise rename just after a scan
    in every round, the slowest case."""
    return SWITCH_MARGIN_S + round_index * SWITCH_WATCH_S / ROUNDS


def publish_under_load(
    url: str, workload: Workload, policy: Path, version: int, lead_s: float, scratch: Path
) -> tuple[dict[str, float], float]:
    """wrk's figures while `version` is published (renamed `lead_s` into the run), and the seconds
    from its rename to its being active (the server's `loaded_at` in /policies: the moment it switched)."""
    command = wrk_command(url, workload, SWITCH_CONCURRENCY, SWITCH_TIMEOUT_S, scratch)
    with httpx.Client(base_url=url, timeout=10) as client:
        if (active := _policy_entry(client)["active"]) != str(version - 1):
            raise RuntimeError(f"before publishing version {version}, version {active} is active")
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(lead_s)
            renamed_at = publish(policy, version, scratch / "staging")
            activated_at = _wait_active(client, str(version), time.monotonic() + SWITCH_TIMEOUT_S - lead_s - SWITCH_MARGIN_S)
            time.sleep(SWITCH_MARGIN_S)
        finally:
            load.send_signal(signal.SIGINT)  # wrk stops and prints its figures
            output, errors = load.communicate(timeout=60)
    if load.returncode != 0:
        raise RuntimeError(f"wrk failed: {errors}")
    return parse_wrk(output), activated_at - renamed_at


def _policy_entry(client: httpx.Client) -> dict[str, Any]:
    return next(entry for entry in client.get("/policies").json()["policies"] if entry["name"] == SWITCHED)


def _wait_active(client: httpx.Client, version: str, deadline: float) -> float:
    """When `version` became active (server time), once /policies says it is."""
    while time.monotonic() < deadline:
        entry = _policy_entry(client)
        status = next((v for v in entry["versions"] if v["version"] == version), {})
        if entry["active"] == version:
            return float(status["loaded_at"])
        if status.get("state") == "failed":
            raise RuntimeError(f"version {version} failed to load: {status['error']}")
        time.sleep(0.1)
    raise RuntimeError(f"version {version} not active within {SWITCH_TIMEOUT_S} s")


def _check_answered_by(url: str, workload: Workload, version: str) -> None:
    answer = httpx.post(url + workload.path, json=workload.body, headers={"access-token": API_KEY}, timeout=10)
    if answer.status_code != 200 or answer.headers.get("x-policy-version") != version:
        raise RuntimeError(f"after the switch to version {version}: {answer.status_code} {answer.headers.get('x-policy-version')}")


def levels_of(config: Config, concurrencies: tuple[int, ...]) -> tuple[int, ...]:
    if config.levels:
        return config.levels
    return concurrencies if config.name in SWEPT else (1, 32)


def _median(rounds: list[Run]) -> Run:
    """The round of median throughput, with the highest RSS seen, every error counted and the
    median switch time and CPU per request."""
    middle = sorted(rounds, key=lambda run: run.requests_per_s)[len(rounds) // 2]
    switches = [r.switch_s for r in rounds if r.switch_s is not None]
    cpu = [r.cpu_us_per_request for r in rounds if r.cpu_us_per_request is not None]
    return replace(
        middle,
        rss_mib=max(r.rss_mib for r in rounds),
        errors=sum(r.errors for r in rounds),
        switch_s=statistics.median(switches) if switches else None,
        cpu_us_per_request=statistics.median(cpu) if cpu else None,
    )


# --- reporting --------------------------------------------------------------------------------


def reference_for(config: str) -> str:
    return "reference-mlp24" if config.endswith("mlp24") else "reference"


def report(runs: list[Run], configs: list[Config], duration: int, writer: list[dict[str, Any]]) -> str:
    """RESULTS.md: the runs, and `writer` (bench/experience_writer.py's figures) in the experience section."""
    by_key = {(r.config, r.workload, r.concurrency): r for r in runs}
    lines = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} by `make bench` (`bench/run.py`), {duration:g} s per run, on {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}. The load generator is wrk (one thread) on the same machine. "
        "Ratios compare with the plain-FastAPI reference serving the same model in the same run "
        "(×reference > 1 is faster for throughput; p50 ratio < 1 is faster for latency).",
        "",
        *peer_table(runs, configs),
        "## Every configuration",
        "",
        "| config | workload | c | req/s | obs/s | p50 ms | p99 ms | throughput ×reference | p50 ×reference | RSS MiB | ready s | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in (r for r in runs if r.failure is None):
        base = by_key.get((reference_for(run.config), run.workload, run.concurrency))
        ratio = f"{run.requests_per_s / base.requests_per_s:.2f}" if base and base.requests_per_s else "–"
        p50 = f"{run.p50_ms / base.p50_ms:.2f}" if base and base.p50_ms else "–"
        lines.append(
            f"| {run.config} | {run.workload} | {run.concurrency} | {run.requests_per_s:,.0f} | {run.observations_per_s:,.0f} | {run.p50_ms:.3f} | "
            f"{run.p99_ms:.3f} | {ratio} | {p50} | {run.rss_mib:.0f} | {run.ready_s:.2f} | {run.errors} |"
        )
    lines += ["", "Configurations:", ""] + [f"- `{c.name}`: {c.note}" for c in configs]
    lines += ["", "## Targets", "", *targets(by_key), *peer_targets(runs), *experience_targets(by_key, writer), ""]
    if any(run.config in REPOSITORY_CONFIGS for run in runs):
        lines += ["## Several policies, a version switch under load", "", REPOSITORY_METHOD, ""]
    lines += experience_section(by_key, writer)
    lines += [(BENCH / "tuning.md").read_text().strip()]
    return "\n".join(lines) + "\n"


# The peer table's figures: (column, True where higher is better).
PEER_COLUMNS = (
    ("c=1 req/s", True),
    ("c=1 p50 ms", False),
    ("c=32 req/s", True),
    (f"batch{BATCH_ROWS} obs/s", True),
    ("RSS MiB", False),
    ("first answer s", False),
)
PEER_FORMATS = ("{:,.0f}", "{:.3f}", "{:,.0f}", "{:,.0f}", "{:.0f}", "{:.2f}")
PEER_METHOD = f"""\
Each peer serves the same model (the default example as TorchScript, one torch thread, an action
sampled from the softmax and its probability, as `reference` does) from its own venv, made by the
harness from `bench/peers/<peer>/requirements.txt`, in its framework's documented fastest CPU
configuration (each folder's README says which and why). The one-core peers run pinned on the
server core as ours do, each alone (started after the servers before it stopped: an idle LitServe
worker polls its queue, ~8 % of a core, which would slow whichever server the core is measuring);
Ray Serve, like our `ray` rows, has both cores. Same workloads: /predict at c=1 and c=32, {BATCH_ROWS} observations per request at c=1,
each the median of {ROUNDS} rounds; where a framework dictates its request shape (BentoML's batchable
list, KServe V1, Triton's Open Inference Protocol), the same observations go in its shape. RSS is the
whole process tree's, at its highest; first answer is from process start to the first 200 answer of
a real predict request (the peers have no `/ready`; each was started once before, untimed, as ours
was), and for ours the time to `/ready` (which answers once the model is loaded and warmed). Errors
are non-2xx answers and socket errors, summed over the rounds. Ratios: ours ÷ the best peer in that
column (> 1 is better for throughput, < 1 for latency, memory and start)."""


def peer_figures(runs: list[Run], config: str) -> list[float] | None:
    """One row of the peer table (PEER_COLUMNS' order), or None if the configuration was not measured."""
    rows = {(r.workload, r.concurrency): r for r in runs if r.config == config and r.failure is None}
    one, many, batch = rows.get(("predict", 1)), rows.get(("predict", 32)), rows.get((f"batch{BATCH_ROWS}", 1))
    if not (one and many and batch):
        return None
    rss = max(r.rss_mib for r in rows.values())
    return [one.requests_per_s, one.p50_ms, many.requests_per_s, batch.observations_per_s, rss, one.ready_s]


def best_peers(runs: list[Run]) -> list[tuple[float, str]] | None:
    """Per column, the best peer's figure and its name; None if no peer was measured."""
    measured = {peer.label: figures for peer in peers.PEERS if (figures := peer_figures(runs, f"peer-{peer.name}"))}
    if not measured:
        return None
    best = []
    for index, (_, higher) in enumerate(PEER_COLUMNS):
        pick = max if higher else min
        name = pick(measured, key=lambda label: measured[label][index])
        best.append((measured[name][index], name))
    return best


def peer_table(runs: list[Run], configs: list[Config]) -> list[str]:
    """The leading table: each peer, the best peer per column, ours (`local`) and ours ÷ the best."""
    if not any(r.config.startswith("peer-") for r in runs):
        return []
    header = " | ".join(column for column, _ in PEER_COLUMNS)
    lines = [
        "## Against the peers",
        "",
        f"| server | {header} | errors | configuration |",
        "| --- |" + " ---: |" * (len(PEER_COLUMNS) + 1) + " --- |",
    ]
    notes = {c.name: c.note for c in [*configs, *configurations()]}

    def cells(figures: list[float]) -> str:
        return " | ".join(form.format(value) for form, value in zip(PEER_FORMATS, figures, strict=True))

    for peer in peers.PEERS:
        name = f"peer-{peer.name}"
        label = f"{peer.label} {peers.version(peer)}"
        failure = next((r.failure for r in runs if r.config == name and r.failure), None)
        figures = peer_figures(runs, name)
        if figures:
            errors = sum(r.errors for r in runs if r.config == name)
            lines.append(f"| {label} | {cells(figures)} | {errors} | {peer.note} |")
        elif failure or any(r.config == name for r in runs):
            lines.append(f"| {label} |" + " – |" * (len(PEER_COLUMNS) + 1) + f" not measured here: {failure or 'incomplete'} |")
    best, ours = best_peers(runs), peer_figures(runs, "local")
    if best:
        lines.append(
            "| **best peer** | "
            + " | ".join(f"{form.format(v)} ({who})" for form, (v, who) in zip(PEER_FORMATS, best, strict=True))
            + " | | |"
        )
    if ours:
        errors = sum(r.errors for r in runs if r.config == "local")
        lines.append(f"| **ours** (`local`) | {cells(ours)} | {errors} | {notes.get('local', '')} |")
    if best and ours:
        lines.append(
            "| **ours ÷ best peer** | "
            + " | ".join(f"{mine / v:.2f}×" if v else "–" for mine, (v, _) in zip(ours, best, strict=True))
            + " | | |"
        )
    return [*lines, "", PEER_METHOD, ""]


def peer_targets(runs: list[Run]) -> list[str]:
    """Issue 13's targets against the peers: c=32 throughput, c=1 p50, memory."""
    best, ours = best_peers(runs), peer_figures(runs, "local")
    if not (best and ours):
        return []
    (_, _), (p50, p50_peer), (c32, c32_peer), _, (rss, rss_peer), _ = best
    return [
        check("local c=32 throughput ≥ 1.5× the best peer's", ours[2] >= 1.5 * c32, f"{ours[2] / c32:.2f}× ({c32_peer}: {c32:,.0f} req/s)"),
        check("local c=1 p50 ≤ the best peer's", ours[1] <= p50, f"{ours[1]:.3f} against {p50:.3f} ms ({p50_peer})"),
        check("local RSS ≤ the smallest peer's", ours[4] <= rss, f"{ours[4]:.0f} against {rss:.0f} MiB ({rss_peer})"),
    ]


REPOSITORY_CONFIGS = ("repo-1", "repo-10", "switch-under-load")
REPOSITORY_METHOD = f"""\
`repo-1` and `repo-10` are our server on a repository (`POLICY_SERVER_DIR` a folder of policy
folders) of one and of {REPOSITORY_SIZE} copies of the default example, each copy under its own name
and key, `POLICY_SERVER_DEFAULT` the first; they run in the same interleaved rounds as the other
one-core servers. Memory per extra policy is (RSS of `repo-10` − RSS of `repo-1`) / {REPOSITORY_SIZE - 1}, each
the server's process tree at its highest over its runs; the throughput target compares their
/predict (the default policy) at c=32.

`switch-under-load` is one server on a repository of one policy. Each of its {ROUNDS} rounds publishes
the next version (2, 3, ...: the default example's model again, written elsewhere and renamed into
`models/N`, as the README says) and runs wrk on /predict at c={SWITCH_CONCURRENCY} three times back to back:
`predict:before`, `predict:during` and `predict:after`. The during run starts {SWITCH_MARGIN_S:g} to {switch_lead_s(ROUNDS - 1):.1f} s
before the rename (each round renames at another point of the watcher's period) and ends {SWITCH_MARGIN_S:g} s
after `/policies` shows the new version active. A row is the median of its rounds; its errors
(non-2xx answers and socket errors) are summed over them. After each round, an answer's
`X-Policy-Version` must name the new version. Rename → active is the new version's `loaded_at` in
`/policies` less the moment of the rename (the median of the rounds). With the watcher's default
period (`POLICY_SERVER_WATCH`, {SWITCH_WATCH_S:g} s) it is {SWITCH_WATCH_S:g} to {2 * SWITCH_WATCH_S:g} s, mostly waiting: a version is loaded
once two scans in a row saw the same files, and loading it beside the active one is a small part
of that. So the during run is mostly steady serving, and a dip while the version loads is averaged
over it. The copied model's trace is cached (by its sha256): a new model also pays its first trace
while it loads (the `local` first start, in the targets)."""


def check(label: str, ok: bool | None, figure: str) -> str:
    verdict = "not measured" if ok is None else ("met" if ok else "**missed**")
    return f"- {label}: {figure} — {verdict}"


def targets(by_key: dict[tuple[str, str, int], Run]) -> list[str]:
    local32, ref32 = by_key.get(("local", "predict", 32)), by_key.get(("reference", "predict", 32))
    local1, ref1 = by_key.get(("local", "predict", 1)), by_key.get(("reference", "predict", 1))
    batch = by_key.get(("local", f"batch{BATCH_ROWS}", 1))
    local_runs = [r for (name, _, _), r in by_key.items() if name == "local"]
    ray32, seed32 = by_key.get(("ray", "predict", 32)), by_key.get(("seed-ray", "predict", 32))
    ray_runs = [r for (name, _, _), r in by_key.items() if name == "ray"]
    rows = []
    if local32 and ref32:
        rows.append(
            check(
                "local c=32 throughput ≥ 1.0× reference",
                local32.requests_per_s >= ref32.requests_per_s,
                f"{local32.requests_per_s / ref32.requests_per_s:.2f}×",
            )
        )
    if local1 and ref1:
        rows.append(check("local c=1 p50 ≤ 1.2× reference", local1.p50_ms <= 1.2 * ref1.p50_ms, f"{local1.p50_ms / ref1.p50_ms:.2f}×"))
    if batch:
        rows.append(
            check(
                f"/predict_batch with {BATCH_ROWS} observations ≥ 200,000 obs/s",
                batch.observations_per_s >= 200_000,
                f"{batch.observations_per_s:,.0f} obs/s",
            )
        )
    if local_runs:
        rows.append(
            check("local RSS ≤ 350 MiB", max(r.rss_mib for r in local_runs) <= 350, f"{max(r.rss_mib for r in local_runs):.0f} MiB")
        )
        ready = local_runs[0]
        cold = f" (first start of a new .pt2, tracing it: {ready.cold_ready_s:.2f} s)" if ready.cold_ready_s is not None else ""
        rows.append(check("local time to ready ≤ 3 s", ready.ready_s <= 3, f"{ready.ready_s:.2f} s{cold}"))
    if ray32 and seed32:
        # The seed design collapses under load: its c=32 median may be no answer at all.
        times = f"{ray32.requests_per_s / seed32.requests_per_s:.2f}×" if seed32.requests_per_s else "∞ (the seed design answered nothing)"
        rows.append(check("ray c=32 throughput ≥ 2× the seed design", ray32.requests_per_s >= 2 * seed32.requests_per_s, times))
    if ray_runs:
        rows.append(check("ray time to ready ≤ 25 s", ray_runs[0].ready_s <= 25, f"{ray_runs[0].ready_s:.2f} s"))
    return rows + speed_targets(by_key) + repository_targets(by_key)


RAY_C32_BEFORE = 323  # req/s, ray at c=32 when issue 13 was filed (each request its own handle call)
C1_P50_TARGET_MS = 0.30


def speed_targets(by_key: dict[tuple[str, str, int], Run]) -> list[str]:
    """Issue 13's: ray near local, local c=1 latency, the metrics' cost, /predict_batch against the orjson script."""
    batch = f"batch{BATCH_ROWS}"
    local32, ray32 = by_key.get(("local", "predict", 32)), by_key.get(("ray", "predict", 32))
    ray64, ray2_64 = by_key.get(("ray", "predict", 64)), by_key.get(("ray-2-replicas", "predict", 64))
    local_batch, ray_batch, script_batch = (by_key.get((config, batch, 1)) for config in ("local", "ray", "orjson-script"))
    local1, unmetered32 = by_key.get(("local", "predict", 1)), by_key.get(("local-no-metrics", "predict", 32))
    rows = []
    if local32 and ray32:
        ratio = ray32.requests_per_s / local32.requests_per_s
        rows.append(check("ray c=32 ≥ 0.5× local c=32", ratio >= 0.5, f"{ratio:.2f}× ({ray32.requests_per_s:,.0f} req/s)"))
        times = ray32.requests_per_s / RAY_C32_BEFORE
        rows.append(check(f"ray c=32 ≥ 10× its {RAY_C32_BEFORE} req/s before coalescing", times >= 10, f"{times:.1f}×"))
    if ray64 and ray2_64:
        rows.append(
            check(
                "ray with 2 replicas ≥ ray with 1 at c=64",
                ray2_64.requests_per_s >= ray64.requests_per_s,
                f"{ray2_64.requests_per_s:,.0f} against {ray64.requests_per_s:,.0f} req/s",
            )
        )
    if ray_batch and local_batch:
        ratio = ray_batch.observations_per_s / local_batch.observations_per_s
        rows.append(check(f"ray /predict_batch ({BATCH_ROWS}) ≥ 0.7× local", ratio >= 0.7, f"{ratio:.2f}×"))
    if local1:
        rows.append(check(f"local c=1 p50 ≤ {C1_P50_TARGET_MS:.2f} ms", local1.p50_ms <= C1_P50_TARGET_MS, f"{local1.p50_ms:.3f} ms"))
    if local32 and unmetered32:
        cost = 1 - local32.requests_per_s / unmetered32.requests_per_s
        rows.append(
            check(
                "metrics cost ≤ 5 % at c=32",
                cost <= 0.05,
                f"{100 * cost:.1f} % ({local32.requests_per_s:,.0f} against {unmetered32.requests_per_s:,.0f} req/s without)",
            )
        )
    if local_batch and script_batch:
        ratio = local_batch.observations_per_s / script_batch.observations_per_s
        rows.append(check(f"/predict_batch ({BATCH_ROWS}) ≥ 1.2× the orjson script", ratio >= 1.2, f"{ratio:.2f}×"))
    return rows


def repository_targets(by_key: dict[tuple[str, str, int], Run]) -> list[str]:
    """Several policies in one server (`repo-10` against `repo-1`), and a version switch under load."""
    rows = []
    one, many = by_key.get(("repo-1", "predict", 32)), by_key.get(("repo-10", "predict", 32))
    if one and many:
        rss_one, rss_many = (max(r.rss_mib for (name, _, _), r in by_key.items() if name == config) for config in ("repo-1", "repo-10"))
        per_policy = (rss_many - rss_one) / (REPOSITORY_SIZE - 1)
        figure = f"{per_policy:.1f} MiB (RSS {rss_one:.0f} → {rss_many:.0f} MiB; time to ready {one.ready_s:.2f} → {many.ready_s:.2f} s)"
        rows.append(check(f"{REPOSITORY_SIZE} policies: memory per extra policy ≤ 30 MiB", per_policy <= 30, figure))
        ratio = many.requests_per_s / one.requests_per_s
        rows.append(
            check(f"{REPOSITORY_SIZE} policies: the default's c=32 throughput within 5 % of one policy's", ratio >= 0.95, f"{ratio:.2f}×")
        )
    phases = [by_key.get(("switch-under-load", f"predict:{phase}", SWITCH_CONCURRENCY)) for phase in SWITCH_PHASES]
    if all(phases):
        errors = sum(run.errors for run in phases if run)
        rates = " / ".join(f"{run.requests_per_s:,.0f}" for run in phases if run)
        during = phases[1]
        switch = f"; rename → active {during.switch_s:.2f} s" if during and during.switch_s is not None else ""
        figure = f"{errors} failed requests; req/s before / during / after {rates}{switch}"
        rows.append(check(f"a version published under load (c={SWITCH_CONCURRENCY}): no failed request", errors == 0, figure))
    return rows


LOGGING_ON, LOGGING_OFF = "local-experience", "local"
LOGGING_RATIO_TARGET = 0.9
EXPERIENCE_METHOD = f"""\
`{LOGGING_ON}` is `{LOGGING_OFF}` (the same server, policy and core) with POLICY_SERVER_EXPERIENCE_DIR
set to a temporary directory the harness makes and removes: the policy logs with the defaults (a
Parquet chunk per second, files rotated at 64 MiB or 60 minutes, 503 beyond 200,000 rows pending).
Its requests name episodes: /predict?episode_id=c<k>, k taking the numbers of the c connections in
turn (each episode's steps count up), and /predict_batch?episode_id=c0 whose observations name their
`agent_id`, a0 … a{BATCH_ROWS - 1} (a step for each of {BATCH_ROWS} agents per request). It runs in the same interleaved rounds as
`{LOGGING_OFF}`, whose requests are the same observations naming no episode: "on ÷ off" is the ratio of
the two medians, "per round" the median of the rounds' own ratios (each round runs `{LOGGING_OFF}` then
`{LOGGING_ON}` seconds apart, so the VM's drift, ±30 % between runs minutes apart here, mostly cancels
in it; the target is judged on it, with `--rounds 15` for this comparison: bench/run.py
--configs {LOGGING_OFF},{LOGGING_ON} --no-sweep --duration 30 --rounds 15). Server CPU is that of every
process and thread of the server, from /proc, over the requests a run answered (the median of the
rounds); off ÷ on is what throughput would be on a core with nothing else to do. Rows logged per request are
the rows the log took during a run (written and pending, from its /info) over the requests answered
2xx: a little over 1 (or {BATCH_ROWS}), as wrk does not count the answers in flight when it stops. Errors
are the log's refusals (503 while 200,000 rows wait for the disk): it takes at most that many rows
per flush interval, so {BATCH_ROWS}-row batches faster than ~195 a second are refused in part.

The writer alone is `bench/experience_writer.py` (`make bench` runs it first): the log in one
process, its real writer thread writing Parquet into a temporary directory, fed by a producer that
calls `admit()` and `record_steps()` as the routes do, with the default example's real decisions on
random observations, for a fixed time per shape (1,024-row pieces as a /predict_batch naming 1,024
agents makes, 1-row pieces as /predict makes); a refused admission waits 1 ms, as a client told 503
would. Rows/s written are the rows read back from the files (counted: the script fails if they are
not every row accepted) over the time until the flush that wrote the last of them; close is the last
flush plus merging the chunks into one file; writer CPU is its thread's (from /proc), so rows per
writer CPU second is what the writer itself can do; bytes/row is the files' size (zstd) over the rows.
Two limits other than the writer show: the 1,024-row shape is accepted at most at 200,000 rows (the
pending bound) per flush interval, and the 1-row shape is fed by one Python thread sharing the GIL
with the writer."""


def experience_section(by_key: dict[tuple[str, str, int], Run], writer: list[dict[str, Any]]) -> list[str]:
    """Logging on against off, in the same rounds, and the writer's own rate."""
    pairs = [(key, on, by_key.get((LOGGING_OFF, *key[1:]))) for key, on in by_key.items() if key[0] == LOGGING_ON]
    if not pairs and not writer:
        return []
    lines = [
        "## Experience logging (issue 14)",
        "",
        "| workload | c | rounds | logging off req/s | logging on req/s | on ÷ off | per round | server CPU µs/request off / on "
        "| CPU off ÷ on | p50 ms off / on | p99 ms off / on | rows logged per request | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (_, workload, c), on, off in pairs:
        ratio = f"{on.requests_per_s / off.requests_per_s:.2f}×" if off and off.requests_per_s else "–"
        paired = f"{on.paired_ratio:.2f}×" if on.paired_ratio is not None else "–"
        p50 = f"{off.p50_ms:.3f} / {on.p50_ms:.3f}" if off else f"– / {on.p50_ms:.3f}"
        p99 = f"{off.p99_ms:.3f} / {on.p99_ms:.3f}" if off else f"– / {on.p99_ms:.3f}"
        logged = f"{on.logged_per_request:,.3f}" if on.logged_per_request is not None else "–"
        off_rate = f"{off.requests_per_s:,.0f}" if off else "–"
        cpu_ratio = _cpu_ratio(on, off)
        cpu = f"{off.cpu_us_per_request:.0f} / {on.cpu_us_per_request:.0f}" if off and cpu_ratio is not None else "–"
        lines.append(
            f"| {workload} | {c} | {on.rounds} | {off_rate} | {on.requests_per_s:,.0f} | {ratio} | {paired} | {cpu} "
            f"| {f'{cpu_ratio:.2f}×' if cpu_ratio is not None else '–'} | {p50} | {p99} | {logged} | {on.errors} |"
        )
    if writer:
        lines += ["", "The writer alone (`bench/experience_writer.py`):", "", *experience_writer.section(writer)]
    return [*lines, "", EXPERIENCE_METHOD, ""]


def _cpu_ratio(on: Run, off: Run | None) -> float | None:
    """The server's CPU per request with logging off ÷ on (the throughput ratio of a CPU-bound core)."""
    if off is None or off.cpu_us_per_request is None or not on.cpu_us_per_request:
        return None
    return off.cpu_us_per_request / on.cpu_us_per_request


def experience_targets(by_key: dict[tuple[str, str, int], Run], writer: list[dict[str, Any]]) -> list[str]:
    """Issue 14's: logging costs at most 10 % of /predict's throughput at c=1 and c=32; the writer's rate."""
    rows = []
    for c in (1, 32):
        on, off = by_key.get((LOGGING_ON, "predict", c)), by_key.get((LOGGING_OFF, "predict", c))
        if on and off and off.requests_per_s:
            medians = on.requests_per_s / off.requests_per_s
            ratio = on.paired_ratio if on.paired_ratio is not None else medians
            figure = (
                f"{ratio:.2f}×, the median of {on.rounds} rounds' ratios (medians: {on.requests_per_s:,.0f} against "
                f"{off.requests_per_s:,.0f} req/s, {medians:.2f}×)"
            )
            rows.append(check(f"/predict logging on ≥ {LOGGING_RATIO_TARGET}× logging off at c={c}", ratio >= LOGGING_RATIO_TARGET, figure))
        cpu_ratio = _cpu_ratio(on, off) if on else None
        if on and off and cpu_ratio is not None:
            figure = f"{cpu_ratio:.2f}× ({off.cpu_us_per_request:.0f} against {on.cpu_us_per_request:.0f} µs of server CPU per request)"
            label = f"/predict logging on ≥ {LOGGING_RATIO_TARGET}× logging off at c={c}, in server CPU per request"
            rows.append(check(label, cpu_ratio >= LOGGING_RATIO_TARGET, figure))
    return rows + [check(label, met, figure) for label, met, figure in experience_writer.targets(writer)]


def plot(runs: list[Run], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.5, 4))
    for name in SWEPT:
        points = sorted((r.concurrency, r.requests_per_s) for r in runs if r.config == name and r.workload == "predict")
        if len(points) > 1:
            axes.plot(*zip(*points, strict=True), marker="o", label=name)
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent connections",
        ylabel="requests/s (log scale)",
        title="/predict, one observation (2 cores, wrk on the same machine)",
    )
    axes.set_xticks(SWEEP, [str(c) for c in SWEEP])
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(target, dpi=110)


def read_runs(results: Path) -> list[Run]:
    return [Run(**row) for row in json.loads(results.read_text())] if results.exists() else []


def updated(earlier: list[Run], measured: list[Run]) -> list[Run]:
    """The rows measured now in place of the earlier ones of the same configurations; the others kept, all in the configurations' order."""
    order = [config.name for config in configurations()]
    measured_configs = {run.config for run in measured}
    kept = [run for run in earlier if run.config not in measured_configs] + measured
    return sorted(kept, key=lambda run: order.index(run.config) if run.config in order else len(order))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(c.name for c in configurations()))
    parser.add_argument("--no-sweep", action="store_true", help="only c=1 and c=32 (no throughput-vs-concurrency plot)")
    parser.add_argument("--out", type=Path, default=BENCH, help="where results.json and RESULTS.md go")
    parser.add_argument("--plot", type=Path, default=REPO / "assets" / "bench.png")
    parser.add_argument("--from-results", action="store_true", help="measure nothing: write RESULTS.md and the plot from results.json")
    parser.add_argument("--update", action="store_true", help="keep results.json's rows of the configurations not measured now")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved wrk runs per figure, duration/rounds seconds each")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed; fix: apt-get install -y wrk")
    wanted = set(filter(None, args.configs.split(",")))
    configs = [c for c in configurations() if not wanted or c.name in wanted]
    concurrencies = (1, 32) if args.no_sweep else SWEEP
    if args.from_results:
        runs = read_runs(args.out / "results.json")
        (args.out / "RESULTS.md").write_text(report(runs, configs, args.duration, experience_writer.read(args.out)))
        plot(runs, args.plot)
        print(f"wrote {args.out / 'RESULTS.md'} from its results.json")
        return
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="policy-bench-") as scratch:
        folders = prepare_policies(Path(scratch) / "policies")
        measured, runs = available(configs, folders, Path(scratch))
        # Our one-core servers and the baselines side by side, interleaved; each peer and each Ray
        # server alone (Ray needs both cores; an idle LitServe worker polls its queue, which would
        # slow whichever server the same core is measuring).
        ours = [c for c in measured if c.pinned and not c.switch and not c.peer]
        groups = [ours] + [[c] for c in measured if (c.peer or not c.pinned) and not c.switch]
        for group in filter(None, groups):
            runs += measure(group, folders, args.duration, Path(scratch), concurrencies, args.rounds)
        for config in measured:
            if config.switch:
                runs += measure_switch(config, folders[config.policy], args.duration, Path(scratch))
    if args.update:
        runs = updated(read_runs(args.out / "results.json"), runs)
        configs = [c for c in configurations() if c.name in {r.config for r in runs}]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    (args.out / "RESULTS.md").write_text(report(runs, configs, args.duration, experience_writer.read(args.out)))
    if not args.no_sweep:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(runs, args.plot)
    print(f"wrote {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
