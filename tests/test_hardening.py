"""Production behaviour over a real server (issue 11, DESIGN.md §14): keys never logged or echoed,
upgrade requests answered whole, SIGTERM drained, overload shed, stalled clients cut, auth first."""

import asyncio
import json
import resource
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
from conftest import API_KEY, AUTH, MOUSE_OBSERVATION, MOUSE_SCHEMA, MakePolicyDir
from fastapi.testclient import TestClient
from servers import Server, clean_env, free_port, running_server, serve_command, sigterm_under_keep_alive_load, uvicorn_command

BODY = json.dumps(MOUSE_OBSERVATION).encode()


@contextmanager
def served(folder: Path, *, env: dict[str, str] | None = None, uvicorn_args: list[str] | None = None) -> Iterator[Server]:
    """`generate.py serve` on `folder` (or `uvicorn app:app ARGS` in it), stopped after."""
    port = free_port()
    command = [*uvicorn_command(port), *uvicorn_args] if uvicorn_args is not None else serve_command(folder, port)
    with running_server(command, port, cwd=folder, env=env) as server:
        yield server


# --- 1. the api key appears in no log line and no answer -------------------------------------

KEY_PLACES = [
    ("GET", "/info?access-token={key}", None),
    ("GET", "/info?api_key={key}", None),
    ("GET", "/info?api_key={encoded}", None),
    ("POST", "/predict?api_key={key}", BODY),
    ("GET", "/{key}", None),
    ("GET", "/predict/{encoded}/x", None),
    ("POST", "/{key}?token={key}", BODY),
    ("POST", "/predict", json.dumps({"mouse_row": "{key}"}).encode()),
    ("POST", "/predict", b'{"api_key": "{key}", ' + BODY[1:]),
    ("POST", "/predict", b"{key} is not json"),
]


@pytest.mark.parametrize("how", ["generate.py serve", "uvicorn --log-level trace"])
def test_the_key_is_in_no_log_line_and_no_answer(mouse_dir: Path, how: str) -> None:
    encoded = "".join(f"%{ord(char):02X}" for char in API_KEY)
    uvicorn_args = None if how == "generate.py serve" else ["--log-level", "trace", "--access-log"]
    answers = []
    with served(mouse_dir, uvicorn_args=uvicorn_args) as server, httpx.Client(base_url=server.url) as client:
        for method, path, body in KEY_PLACES:
            for headers in ({}, AUTH):  # without the key's header, and with it
                content = body.replace(b"{key}", API_KEY.encode()) if body else None
                response = client.request(method, path.format(key=API_KEY, encoded=encoded), content=content, headers=headers)
                assert response.status_code < 500
                answers.append(f"{response.status_code} {dict(response.headers)} {response.text}")
    assert answers
    for answer in answers:
        assert API_KEY not in answer
    assert "/info?api_key=***" in server.log or how != "generate.py serve"  # the line is there, redacted
    assert API_KEY not in server.log
    assert encoded not in server.log
    assert quote(API_KEY) not in server.log


# --- 4. Upgrade: h2c ---------------------------------------------------------------------------


def _raw_request(port: int, *parts: bytes) -> bytes:
    """Send `parts` a moment apart on one connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(0.2)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_an_h2c_upgrade_request_is_answered_whole_over_http1(mouse_dir: Path) -> None:
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Type: application/json\r\naccess-token: {API_KEY}\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    second = (f"POST /predict_deterministic HTTP/1.1\r\nHost: x\r\naccess-token: {API_KEY}\r\nContent-Length: {len(BODY)}\r\n").encode()
    with served(mouse_dir) as server:
        port = int(server.url.rsplit(":", 1)[1])
        answer = _raw_request(port, head + BODY[:10], BODY[10:] + second, b"Connection: close\r\n\r\n" + BODY)
        expected = httpx.post(f"{server.url}/predict_deterministic", json=MOUSE_OBSERVATION, headers=AUTH).json()
    first_status, rest = answer.split(b"\r\n", 1)
    assert first_status == b"HTTP/1.1 200 OK"
    assert b'"actions"' in rest
    assert answer.count(b"HTTP/1.1 200 OK") == 2  # the next request on the connection, too
    assert json.dumps(expected, separators=(",", ":")).encode() in answer


def test_javas_http_client_gets_its_answer(mouse_dir: Path, tmp_path: Path) -> None:
    """java.net.http.HttpClient asks to upgrade to h2c on every POST by default."""
    source = tmp_path / "Predict.java"
    source.write_text(
        """
import java.net.URI;
import java.net.http.*;
public class Predict {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        for (int i = 0; i < 3; i++) {
            HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
                .header("Content-Type", "application/json").header("access-token", args[1])
                .POST(HttpRequest.BodyPublishers.ofString(args[2])).build();
            HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
            System.out.println(response.statusCode() + " " + response.body());
        }
    }
}
"""
    )
    with served(mouse_dir) as server:
        run = subprocess.run(
            ["java", str(source), f"{server.url}/predict_deterministic", API_KEY, BODY.decode()],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith('200 {"actions":') for line in lines), lines


# --- 5. SIGTERM drains -------------------------------------------------------------------------


def test_sigterm_drains_keep_alive_clients_without_a_reset(mouse_dir: Path) -> None:
    port = free_port()
    env = {"POLICY_SERVER_DRAIN_SECONDS": "3"}
    log_path = mouse_dir.parent / "drain.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(serve_command(mouse_dir, port), cwd=mouse_dir, env=clean_env(env), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_ready(url, process)
            drained = sigterm_under_keep_alive_load(process, url, "/predict", BODY, AUTH)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    server_log = log_path.read_text()
    assert not drained.dropped, (drained.outcomes, server_log)
    assert set(drained.outcomes) <= {"answered 200", "answered 200 after SIGTERM", "refused"}, drained.outcomes
    assert drained.outcomes["answered 200 after SIGTERM"] > 0  # the drain served the open connections
    assert drained.ready == ("answered 200", "answered 503")  # the second on its open connection
    assert drained.new_connection == "refused"
    assert drained.returncode in (0, -signal.SIGTERM)
    assert "draining" in server_log


def _wait_until_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        assert process.poll() is None, "the server exited before it was ready"
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server was not ready within 60 s")


# --- 6. load shedding --------------------------------------------------------------------------


class SlowPolicy(torch.nn.Module):
    """Logits after many small matrix products: a forward pass long enough for requests to queue."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(6, 6) * 0.1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        for _ in range(3000):
            obs = torch.tanh(obs @ self.weight)
        return self.head(obs)


def test_overload_is_shed_at_once_with_retry_after(make_policy_dir: MakePolicyDir) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA + "serving: {max_batch_size: 1}\n", SlowPolicy(), 6, "model.pt")
    env = {"POLICY_SERVER_MAX_QUEUE": "4", "POLICY_SERVER_INLINE_MS": "0"}

    async def load(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post("/predict", content=BODY, headers=AUTH) for _ in range(64)))

    with served(folder, env=env) as server:
        responses = asyncio.run(load(server.url))
        info = httpx.get(f"{server.url}/info", headers=AUTH).json()
        metrics = httpx.get(f"{server.url}/metrics").text
    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) == {200, 503}, statuses
    assert statuses[200] >= 4
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "POLICY_SERVER_MAX_QUEUE" in response.json()["detail"]
    assert info["max_queue"] == 4
    assert info["shed"] == statuses[503]
    assert f'policy_server_shed_requests_total{{policy="{info["name"]}"}} {float(statuses[503])}' in metrics
    assert f'policy_server_queue_limit{{policy="{info["name"]}"}} 4.0' in metrics


# --- 10. stalled clients -----------------------------------------------------------------------


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_stalled_clients_are_cut_and_service_goes_on(mouse_dir: Path) -> None:
    """300 connections that never finish their request, against 256 descriptors: the server cuts them
    (408), refuses those over its bound (503), logs both, and keeps answering everyone else."""
    port = free_port()
    env = clean_env({"POLICY_SERVER_REQUEST_TIMEOUT": "2"})
    log_path = mouse_dir.parent / "stalled.log"
    stalled: list[socket.socket] = []
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            serve_command(mouse_dir, port), cwd=mouse_dir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_descriptors
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_ready(url, process)
            for index in range(300):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                if index % 3 == 0:  # a head dribbled, never finished
                    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
                elif index % 3 == 1:  # a body shorter than its Content-Length
                    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\naccess-token: {API_KEY}\r\nContent-Length: 500\r\n\r\n{{".encode())
                stalled.append(sock)  # and every third sends nothing at all
            answered = _answered_within(url, seconds=20)
            replies = [_reply_to(sock) for sock in stalled]
        finally:
            for sock in stalled:
                sock.close()
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    server_log = log_path.read_text()
    assert answered
    kinds = Counter(reply.split(b"\r\n", 1)[0] for reply in replies)
    assert set(kinds) <= {b"HTTP/1.1 408 Request Timeout", b"HTTP/1.1 503 Service Unavailable", b""}, kinds
    assert kinds[b"HTTP/1.1 408 Request Timeout"] > 0
    assert kinds[b"HTTP/1.1 503 Service Unavailable"] > 0
    assert "cut a connection from 127.0.0.1" in server_log
    assert "refused a connection from 127.0.0.1" in server_log


def _answered_within(url: str, seconds: float) -> bool:
    """A normal client gets its answer within `seconds` (polling: a bounded wait, not a timing)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/predict", content=BODY, headers=AUTH, timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def _reply_to(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    try:
        return sock.recv(4096)
    except (ConnectionResetError, TimeoutError):
        return b""


# --- 13. the key before the body ----------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b'{"mouse_row": "3"}', b"[" * 100_000])
def test_the_key_is_checked_before_the_body_is_read(mouse: TestClient, body: bytes) -> None:
    assert mouse.post("/predict", content=body).status_code == 401
    assert mouse.post("/predict_batch", content=body, headers={"access-token": "wrong"}).status_code == 403
    assert mouse.post("/predict", content=body, headers={"content-type": "text/plain"}).status_code == 401
    assert mouse.post("/predict", content=body, headers=AUTH).status_code == 422


@pytest.mark.parametrize("path", ["/predict", "/predict_raw", "/distribution", "/predict_batch", "/info", "/schema", "/clients/python"])
def test_every_guarded_route_refuses_without_the_key(mouse: TestClient, path: str) -> None:
    method = "GET" if path in ("/info", "/schema", "/clients/python") else "POST"
    missing = mouse.request(method, path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert mouse.request(method, path, headers={"access-token": "nope"}).status_code == 403
    assert mouse.request(method, path + "/", headers={"authorization": "Bearer nope"}).status_code == 403
