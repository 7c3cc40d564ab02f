"""Helpers for tests that run the real thing: `uvicorn app:app` or `python generate.py` as subprocesses.

Every process started here is stopped in a `finally`; the network is 127.0.0.1 only.
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
GENERATE = REPO / "generate.py"
START_TIMEOUT_S = 90.0
SERVER_CACHE = tempfile.mkdtemp(prefix="policy-server-test-cache-")
atexit.register(shutil.rmtree, SERVER_CACHE, ignore_errors=True)
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any POLICY_SERVER_* override, the repo importable."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("POLICY_SERVER_")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env["POLICY_SERVER_SDKS"] = "on-request"  # no Java generating SDKs behind every test server
    env["POLICY_SERVER_CACHE_DIR"] = SERVER_CACHE
    env.update(extra or {})
    return env


@dataclass
class Server:
    """A running server process; `log` (stdout and stderr together) and `returncode` are set once it stopped."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: str = ""
    returncode: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def read_log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def uvicorn_command(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]


def serve_command(directory: Path, port: int) -> list[str]:
    return [sys.executable, str(GENERATE), "serve", "--directory", str(directory), "--port", str(port)]


@contextmanager
def running_server(
    command: Sequence[str], port: int, *, cwd: Path, env: Mapping[str, str] | None = None, ready_path: str = "/ready"
) -> Iterator[Server]:
    """Start `command` (listening on 127.0.0.1:`port`), wait until `ready_path` answers 200, yield it,
    then stop it with SIGTERM (SIGKILL if it hangs) and keep its log and return code on the `Server`."""
    log_file = tempfile.NamedTemporaryFile(prefix="policy-server-", suffix=".log", delete=False)  # noqa: SIM115
    log_path = Path(log_file.name)
    process = subprocess.Popen(list(command), cwd=cwd, env=clean_env(env), stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        _wait_ready(server, ready_path)
        yield server
    finally:
        server.returncode = stop(process)
        log_file.close()
        server.log = server.read_log()
        log_path.unlink(missing_ok=True)


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait; SIGKILL if it does not end. Returns the exit code (negative: killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def _wait_ready(server: Server, ready_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited with {server.process.returncode} before it was ready:\n{server.read_log()}")
            try:
                if client.get(ready_path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S} s:\n{server.read_log()}")


def run(
    command: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (killed after `timeout`), capturing stdout and stderr apart."""
    return subprocess.run(list(command), cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout, check=False)


def generate(*args: str, cwd: Path = REPO, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python generate.py ARGS...`."""
    return run([sys.executable, str(GENERATE), *args], cwd=cwd, env=env)


@dataclass
class Drained:
    """What keep-alive clients saw of a server stopped by SIGTERM under their load: outcomes as `attempt` names them."""

    outcomes: Counter[str]  # of the clients' requests, "answered 200 after SIGTERM" for those answered after it
    ready: tuple[str, str]  # /ready on one kept-alive connection: before SIGTERM, then just after
    new_connection: str  # /ready on a connection opened after that
    returncode: int
    exit_seconds: float  # from SIGTERM to the end of the process

    @property
    def dropped(self) -> list[str]:
        return [outcome for outcome in self.outcomes if outcome.startswith("dropped")]


def attempt(request: Callable[[], httpx.Response]) -> str:
    """ "answered STATUS", "refused" (no connection: the port is closed), or "dropped: ERROR" (the
    connection was lost under the request: reset, closed before the answer, ...)."""
    try:
        return f"answered {request().status_code}"
    except httpx.ConnectError:
        return "refused"
    except httpx.TransportError as error:
        return f"dropped: {type(error).__name__}"


def sigterm_under_keep_alive_load(
    process: subprocess.Popen[bytes],
    url: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    clients: int = 8,
    requests_per_client: int = 5000,
    answers_before: int = 200,
) -> Drained:
    """`clients` threads, each POSTing `body` to `path` in a loop on one keep-alive connection until
    a request is not answered (at most `requests_per_client`); once they had `answers_before`
    answers, SIGTERM to `process`, /ready asked on a connection opened before, and the process
    awaited (at most STOP_TIMEOUT_S; the caller kills it if it is still running)."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    signalled, abandoned = threading.Event(), threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=10, limits=httpx.Limits(max_keepalive_connections=1)) as session:
            for _ in range(requests_per_client):
                outcome = attempt(lambda: session.post(path, content=body, headers=headers))
                answered = outcome.startswith("answered")
                if answered and signalled.is_set():
                    outcome += " after SIGTERM"
                with lock:
                    outcomes[outcome] += 1
                if not answered or abandoned.is_set():
                    return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(base_url=url, timeout=5) as probe:  # a load balancer's probe, kept alive
            ready_before = attempt(lambda: probe.get("/ready"))
            deadline = time.monotonic() + START_TIMEOUT_S
            while outcomes.total() < answers_before and time.monotonic() < deadline and any(t.is_alive() for t in threads):
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            signalled.set()
            time.sleep(0.1)
            ready_after = attempt(lambda: probe.get("/ready"))  # on its open connection
            new_connection = attempt(lambda: probe.get("/ready"))  # that answer closed it
    except BaseException:
        abandoned.set()
        raise
    finally:
        for thread in threads:
            thread.join(STOP_TIMEOUT_S)
    returncode = process.wait(STOP_TIMEOUT_S)
    return Drained(outcomes, (ready_before, ready_after), new_connection, returncode, time.monotonic() - sent)
