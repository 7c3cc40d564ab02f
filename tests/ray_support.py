"""Helpers for the tests that run real Ray (test_ray.py, test_ray_cluster.py).

Every Ray node these tests start or join uses node address 127.0.0.2: Ray replaces 127.0.0.1 by
the machine's external address, where traffic is not allowed. Processes are tracked by pid, so
only what a test started is ever stopped.
"""

import contextlib
import ipaddress
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from policy_server.loading import SCHEMA_FILE

NODE_IP = "127.0.0.2"
READY_TIMEOUT_S = 180.0  # Ray and a deployment on a loaded 2-core machine
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@contextmanager
def ray_temp_dir() -> Iterator[str]:
    """A folder for the sessions of the Rays a test starts (as RAY_TMPDIR), removed after. Short:
    Ray's socket paths in it must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def auth_env() -> dict[str, str]:
    """Ray's token auth with a fresh token in the environment: nothing is written to ~/.ray."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def policy_copy(example: str, destination: Path, name: str, serving: str = "") -> Path:
    """A copy of examples/`example` served under `name` (Ray Serve's application name), with a serving section."""
    folder = destination / name
    shutil.copytree(EXAMPLES / example, folder, ignore=shutil.ignore_patterns("*.py", "README.md"))
    schema = folder / SCHEMA_FILE
    text = re.sub(r"^name: .*$", f"name: {name}", schema.read_text(), count=1, flags=re.MULTILINE)
    schema.write_text(text + (f"serving: {serving}\n" if serving else ""))
    return folder


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def non_loopback_connections(processes: Iterable[psutil.Process]) -> list[str]:
    """Connections of these processes whose remote end is outside 127.0.0.0/8 (and ::1)."""
    pids = {process.pid for process in processes}
    found = []
    for connection in psutil.net_connections(kind="inet"):
        if connection.pid not in pids or not connection.raddr:
            continue
        address = ipaddress.ip_address(connection.raddr.ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            found.append(f"pid {connection.pid}: {connection.laddr} -> {connection.raddr}")
    return found


def survivors(processes: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """The processes still running (not zombies) after waiting up to `timeout_s` for them to end."""
    _, alive = psutil.wait_procs(list(processes), timeout=timeout_s)
    return [process for process in alive if _running(process)]


def kill(processes: Iterable[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


def ready_statuses(url: str) -> list[int]:
    """/ready's answers, polled from the moment the port opens until the first 200."""
    statuses: list[int] = []
    with httpx.Client(base_url=url, timeout=30.0) as client:
        wait_until(lambda: statuses.append(client.get("/ready").status_code) or statuses[-1] == 200, READY_TIMEOUT_S, "/ready 200")
    return statuses


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def post_until_stopped(
    url: str, path: str, body: object, headers: dict[str, str], stop: threading.Event, outcomes: list[int | str]
) -> None:
    """POST `body` to `path` in a loop on one connection until `stop`: each status, or the
    transport error's repr, appended to `outcomes` (for a thread of load during a kill)."""
    with httpx.Client(base_url=url, timeout=90.0) as client:
        while not stop.is_set():
            try:
                outcomes.append(client.post(path, json=body, headers=headers).status_code)
            except httpx.HTTPError as exc:
                outcomes.append(repr(exc))
