"""Two Ray nodes for real (`ray start --head` + `ray start --address`, one CPU each, both on
127.0.0.2), and `uvicorn app:app` joining them through RAY_ADDRESS with 2 replicas: one replica
lands on each node and both answer. The server leaves the cluster running; the test then stops
both nodes and checks that none of their processes is left."""

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from conftest import AUTH, MOUSE_OBSERVATION
from ray_support import (
    NODE_IP,
    auth_env,
    descendants,
    kill,
    non_loopback_connections,
    policy_copy,
    ray_temp_dir,
    ready_statuses,
    survivors,
    wait_until,
)
from servers import REPO, clean_env, free_port, running_server, uvicorn_command

RAY = Path(sys.executable).parent / "ray"
NODE_START_TIMEOUT_S = 90.0
NODE_STOP_TIMEOUT_S = 60.0  # `ray start --block` drains for up to 30 s on SIGTERM


@contextmanager
def ray_node(arguments: Sequence[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`ray start --block ARGUMENTS` on 127.0.0.2 with one CPU; on exit SIGTERM, then SIGKILL of whatever is left."""
    command = [str(RAY), "start", "--block", f"--node-ip-address={NODE_IP}", "--num-cpus=1", "--disable-usage-stats"]
    # fixed defaults (52365, 8080...) would collide with the other node or with other Rays on the machine
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    with log.open("wb") as output:
        process = subprocess.Popen([*command, *ports, *arguments], env=clean_env(env), stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        tracked = [psutil.Process(process.pid), *descendants(process.pid)] if process.poll() is None else []
        process.send_signal(signal.SIGTERM)
        left = survivors(tracked, timeout_s=NODE_STOP_TIMEOUT_S)
        kill(left)
    assert left == [], f"processes of the node left running: {left}\n{log.read_text(errors='replace')}"


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((NODE_IP, port)) == 0


def _replicas(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/info", headers=AUTH, timeout=30.0).json()["replica_details"])


def test_two_nodes_one_replica_each(tmp_path: Path) -> None:
    gcs_port = free_port()
    address = f"{NODE_IP}:{gcs_port}"
    folder = policy_copy("mouse_and_cheese", tmp_path, "two_nodes", serving="{replicas: 2}")
    port = free_port()
    head_arguments = ["--head", f"--port={gcs_port}", f"--ray-client-server-port={free_port()}", "--include-dashboard=false"]
    with ExitStack() as nodes:
        env = auth_env() | {"PYTHONPATH": str(REPO), "RAY_TMPDIR": nodes.enter_context(ray_temp_dir())}
        server_env = env | {"RAY_ADDRESS": address, "POLICY_SERVER_RAY_NODE_IP": NODE_IP}
        head = nodes.enter_context(ray_node(head_arguments, env, tmp_path / "head.log"))
        wait_until(lambda: _accepts(gcs_port), NODE_START_TIMEOUT_S, "the head's GCS listens")
        worker = nodes.enter_context(ray_node([f"--address={address}"], env, tmp_path / "worker.log"))
        # one CPU per node and per replica: the deployment is up only once the worker node has joined
        with running_server(uvicorn_command(port), port, cwd=folder, env=server_env, ready_path="/health") as server:
            ready_statuses(server.url)
            assert httpx.get(f"{server.url}/info", headers=AUTH).json()["replicas"] == 2
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda i: _predict(server.url, i), range(80)))
            assert statuses == [200] * 80
            # /info asks the replicas again every few seconds (each time reaching some or all of them)
            wait_until(lambda: _both_answered(_replicas(server.url)), 60, "a replica on each node answers")
            processes = [psutil.Process(pid) for pid in (server.process.pid, head.pid, worker.pid)]
            ray_processes = [*processes, *descendants(head.pid), *descendants(worker.pid)]
            assert non_loopback_connections(ray_processes) == []
        assert server.returncode in (0, -signal.SIGTERM), server.log
        assert "with backend ray, 2 replica(s), on cpu" in server.log
        assert head.poll() is None and worker.poll() is None  # a cluster we joined is left running


def _both_answered(replicas: list[dict[str, Any]]) -> bool:
    """Two replicas on two different nodes, both with predictions answered."""
    nodes = {replica["node_id"] for replica in replicas}
    return len(replicas) == 2 and len(nodes) == 2 and all(replica["rows_answered"] > 0 for replica in replicas)


def _predict(url: str, seed: int) -> int:
    return httpx.post(f"{url}/predict?seed={seed}", json=MOUSE_OBSERVATION, headers=AUTH, timeout=60.0).status_code
