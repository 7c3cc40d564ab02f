"""Start `uvicorn app:app` for a policy folder as a child of the page, and make sure it dies with the page.

Children live in a module-level registry (keyed by URL), not in a streamlit session: a reload of the
browser tab must not lose the handle on the server it started. Each child runs in its own process
group, so "Stop" and the exit handler end it and anything it spawned, and nothing else. Three ways
out are covered: the Stop button, a normal exit of streamlit (SIGTERM, Ctrl-C: `atexit`), and on
Linux a hard death of streamlit (SIGKILL, SIGHUP: the kernel's parent-death signal).
"""

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from policy_server.demo.client import PolicyClient
from policy_server.errors import ConfigError
from policy_server.schema import load_spec

REPO = Path(__file__).resolve().parents[2]  # the folder of app.py
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.2
LOG_TAIL_LINES = 25
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SCHEMA_FILE = "schema.yaml"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class LaunchError(Exception):
    """The server could not be started: `str()` says why; `log_tail` is the end of its log, if it ran."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        super().__init__(reason)
        self.log_tail = log_tail


@dataclass
class ChildServer:
    url: str
    label: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def stop(self) -> None:
        """SIGTERM to its process group, then SIGKILL if it has not ended within STOP_TIMEOUT_S."""
        if self.running:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log_path.unlink(missing_ok=True)


_children: dict[str, ChildServer] = {}
_lock = threading.Lock()
# The kernel sends the parent-death signal when the *thread* that forked the child ends. Streamlit
# runs each script run on a short-lived thread, so children are forked from this one, which lives
# as long as the process.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-server-spawner")
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def policy_folders() -> dict[str, Path]:
    """What the page can serve, by label: the repo's own schema.yaml (if any), each example, then
    every example at once (examples/ is a repository of them)."""
    folders = {f"{SCHEMA_FILE} (this folder)": REPO} if (REPO / SCHEMA_FILE).is_file() else {}
    examples = sorted((REPO / "examples").glob(f"*/{SCHEMA_FILE}"))
    for schema in examples:
        folders[f"examples/{schema.parent.name}"] = schema.parent
    if len(examples) > 1:
        folders["examples/ (every example, one server)"] = REPO / "examples"
    return folders


def is_repository(folder: Path) -> bool:
    """A folder of policy folders rather than one policy (the server's rule: no schema.yaml at its top)."""
    return not (folder / SCHEMA_FILE).is_file()


def policy_schemas(repository: Path) -> dict[str, Path]:
    """The schema.yaml of each policy folder in `repository`, by the policy's name as the server names
    it: the schema's `name`, else its folder's (the first folder of a name, if two share one)."""
    schemas: dict[str, Path] = {}
    for schema in sorted(repository.glob(f"*/{SCHEMA_FILE}")):
        if not schema.parent.name.startswith("."):
            schemas.setdefault(_policy_name(schema), schema)
    return schemas


def _policy_name(schema: Path) -> str:
    try:
        return load_spec(schema).name
    except ConfigError:
        return schema.parent.name  # not served; its error is in /policies under this name


def started_here(url: str) -> ChildServer | None:
    with _lock:
        return _children.get(_normalise(url))


def start(url: str, label: str, folder: Path, api_key: str) -> ChildServer:
    """Start `uvicorn app:app` serving `folder` on the URL's host and port, with `api_key` as its key.
    Returns at once; `wait_until_ready` waits for it."""
    host, port = loopback_address(url)
    env = os.environ | {"POLICY_SERVER_DIR": str(folder), "PYTHONUNBUFFERED": "1"}
    if api_key:
        env["POLICY_SERVER_API_KEY"] = api_key
    env.setdefault("POLICY_SERVER_SDKS", "on-request")  # no Java generating SDKs nobody asked for while the user clicks
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", host, "--port", str(port)]
    with _lock:  # two sessions pressing Start at once: one child per URL, none unregistered
        if _normalise(url) in _children:
            raise LaunchError(f"This page has started a server at {url} already: stop it first.")
        with tempfile.NamedTemporaryFile(prefix="policy-server-demo-", suffix=".log", delete=False) as log_file:
            process = _spawner.submit(
                subprocess.Popen,
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if _libc is not None else None,
            ).result()
        child = _children[_normalise(url)] = ChildServer(_normalise(url), label, process, Path(log_file.name))
    return child


def wait_until_ready(child: ChildServer, on_tick: Callable[[float, str], None], timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `/ready` until it answers 200; `on_tick(elapsed_s, last_log_line)` between polls.
    Stops and forgets the child, raising LaunchError with its log tail, if it exits or times out."""
    client = PolicyClient(child.url, "")
    started = time.monotonic()
    while not client.ready():
        elapsed = time.monotonic() - started
        if not child.running or elapsed > timeout:
            reason = f"exited with code {child.process.returncode}" if not child.running else f"was not ready within {timeout:.0f} s"
            tail = child.log_tail()
            _forget(child)
            raise LaunchError(f"The server {reason}.", tail)
        on_tick(elapsed, (child.log_tail().splitlines() or [""])[-1])
        time.sleep(POLL_S)


def stop(url: str) -> None:
    """End the server this page started at `url` (and only that one); nothing if it started none."""
    with _lock:
        child = _children.pop(_normalise(url), None)
    if child is not None:
        child.stop()


def loopback_address(url: str) -> tuple[str, int]:
    """The host and port to listen on for `url`; LaunchError unless it is http:// on this machine."""
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise LaunchError(f"{url!r} is not a URL: {exc}") from exc
    if parsed.scheme != "http" or parsed.host not in LOOPBACK:
        raise LaunchError(f"A server started here listens on this machine: use http://127.0.0.1:PORT, not {url!r}.")
    return parsed.host, parsed.port or 80


def _forget(child: ChildServer) -> None:
    with _lock:
        if _children.get(child.url) is child:
            del _children[child.url]
    child.stop()


def _normalise(url: str) -> str:
    return url.strip().rstrip("/")


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the spawner thread, i.e. the page's process, dies."""
    assert _libc is not None
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended already
        os.killpg(pid, signum)  # start_new_session: the child leads its own group


@atexit.register
def _stop_all() -> None:
    with _lock:
        children = list(_children.values())
        _children.clear()
    for child in children:
        child.stop()
