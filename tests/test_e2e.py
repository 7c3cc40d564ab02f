"""End to end: the real `uvicorn app:app` (and `python generate.py serve`) over real HTTP on 127.0.0.1."""

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, AUTH, MOUSE_OBSERVATION, MOUSE_SCHEMA, MakePolicyDir, mlp
from servers import REPO, Server, free_port, run, running_server, serve_command, uvicorn_command

BAD_SCHEMAS = {
    "yaml-syntax": "parameters:\n  discrete: true\n   tuple: false\n  api_key: [unclosed\n",
    "unknown-type": MOUSE_SCHEMA.replace("mouse_col: {type: float", "mouse_col: {type: Vector3"),
    "missing-discrete": MOUSE_SCHEMA.replace("  discrete: true\n", ""),
    "no-api-key": MOUSE_SCHEMA.replace('  api_key: "1234567asdfgh"\n', ""),
}


def _check_decision(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["actions", "probability"]
    assert isinstance(body["actions"][0], int) and 0 <= body["actions"][0] < 4
    assert isinstance(body["probability"], float)


def _exercise(server: Server) -> None:
    """What the original's clients and a browser do: /predict/ with access-token, /docs, concurrency."""
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        flat = {**MOUSE_OBSERVATION, "unknown_extra": 3, "actionMask": [True, False]}
        _check_decision(client.post("/predict/", json=flat, headers={"access-token": API_KEY}))
        _check_decision(client.post("/predict", json=MOUSE_OBSERVATION, headers={"Authorization": f"Bearer {API_KEY}"}))
        assert client.post("/predict/", json=MOUSE_OBSERVATION).status_code == 401
        assert client.post("/predict/", json=MOUSE_OBSERVATION, headers={"access-token": "wrong"}).status_code == 403
        docs = client.get("/docs")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
        assert client.get("/openapi.json").json()["paths"]["/predict"]["post"]["operationId"] == "predict"
        assert client.get("/health/").json() == {"status": "ok"}
        assert client.get("/info", headers=AUTH).json()["backend"] == "local"
    _concurrent_requests(server.url, total=200, threads=16)


def _concurrent_requests(url: str, total: int, threads: int) -> None:
    def one_thread(index: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=url, timeout=60.0) as client:
            for i in range(index, total, threads):
                body = {**MOUSE_OBSERVATION, "cheese_row": i % 5}
                path = ("/predict/", "/predict_deterministic", "/distribution", "/predict_batch")[i % 4]
                if path == "/predict_batch":
                    body = {"observations": [body, body]}
                response = client.post(path, json=body, headers=AUTH)
                statuses.append(response.status_code)
                if path.startswith("/predict/"):
                    _check_decision(response)
        return statuses

    with ThreadPoolExecutor(threads) as pool:
        statuses = [status for chunk in pool.map(one_thread, range(threads)) for status in chunk]
    assert len(statuses) == total
    assert statuses == [200] * total


def _assert_clean_exit(server: Server) -> None:
    """A graceful shutdown on SIGTERM. uvicorn (>= 0.29) re-raises the signal once it has shut down,
    so the exit status is 0 or "ended by SIGTERM"; the log shows whether the shutdown completed."""
    assert server.returncode in (0, -signal.SIGTERM), server.log
    assert "Finished loading" in server.log
    assert "Application shutdown complete" in server.log
    assert "Finished server process" in server.log
    assert "Traceback" not in server.log
    assert API_KEY not in server.log


@pytest.fixture
def mouse_folder(make_policy_dir: MakePolicyDir) -> Path:
    return make_policy_dir(MOUSE_SCHEMA, mlp(6, 4), 6)


def test_uvicorn_serves_the_working_directory(mouse_folder: Path) -> None:
    port = free_port()
    with running_server(uvicorn_command(port), port, cwd=mouse_folder) as server:
        _exercise(server)
    _assert_clean_exit(server)


def test_uvicorn_serves_policy_server_dir(mouse_folder: Path, tmp_path: Path) -> None:
    """From elsewhere, with the environment naming the folder, the key and the body limit."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    env = {"POLICY_SERVER_DIR": str(mouse_folder), "POLICY_SERVER_API_KEY": "env-key-5150", "POLICY_SERVER_MAX_BODY_BYTES": "2000"}
    command = [*uvicorn_command(port), "--app-dir", str(REPO)]
    with running_server(command, port, cwd=elsewhere, env=env) as server, httpx.Client(base_url=server.url, timeout=30.0) as client:
        _check_decision(client.post("/predict/", json=MOUSE_OBSERVATION, headers={"access-token": "env-key-5150"}))
        assert client.post("/predict/", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 403

        def chunks() -> Iterator[bytes]:
            text = json.dumps({**MOUSE_OBSERVATION, "padding": "x" * 5000}).encode()
            for start in range(0, len(text), 500):
                yield text[start : start + 500]

        streamed = client.post("/predict", content=chunks(), headers={"access-token": "env-key-5150", "content-type": "application/json"})
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413 and isinstance(streamed.json()["detail"], str)
        declared = client.post("/predict", json={**MOUSE_OBSERVATION, "padding": "x" * 5000}, headers={"access-token": "env-key-5150"})
        assert declared.status_code == 413
        # the connection is still usable and the server still answers
        _check_decision(client.post("/predict", json=MOUSE_OBSERVATION, headers={"access-token": "env-key-5150"}))
    _assert_clean_exit(server)
    assert "env-key-5150" not in server.log


def test_generate_serve(mouse_folder: Path, tmp_path: Path) -> None:
    port = free_port()
    with running_server(serve_command(mouse_folder, port), port, cwd=tmp_path) as server:
        _exercise(server)
    _assert_clean_exit(server)


def _assert_one_line_failure(result: subprocess.CompletedProcess[str], case: str) -> str:
    assert result.returncode != 0, case
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (case, result.stderr)
    (line,) = lines
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, case
    assert "fix:" in line, (case, line)
    return line


def test_uvicorn_refuses_a_bad_folder_in_one_line(make_policy_dir: MakePolicyDir, tmp_path: Path) -> None:
    """A user's mistake: exit non-zero with one line on stderr naming the file, the key and the fix."""
    folders = {case: make_policy_dir(text, mlp(6, 4), 6) for case, text in BAD_SCHEMAS.items()}
    folders["size-mismatch"] = make_policy_dir(MOUSE_SCHEMA, mlp(5, 4), 5)
    folders["size-mismatch-torchscript"] = make_policy_dir(MOUSE_SCHEMA, mlp(5, 4), 5, model_name="model.pt")
    folders["no-model"] = tmp_path / "no-model"
    folders["no-model"].mkdir()
    (folders["no-model"] / "schema.yaml").write_text(MOUSE_SCHEMA)
    expected = {case: [str(folders[case] / "schema.yaml")] for case in BAD_SCHEMAS}
    expected["yaml-syntax"].append("yaml")
    expected["unknown-type"].append("observations.mouse_col")
    expected["missing-discrete"].append("parameters.discrete")
    expected["no-api-key"].append("parameters.api_key")
    expected["size-mismatch"] = [str(folders["size-mismatch"] / "models" / "model.pt2"), "5", "6"]
    expected["size-mismatch-torchscript"] = [str(folders["size-mismatch-torchscript"] / "models" / "model.pt"), "5", "6"]
    expected["no-model"] = [str(folders["no-model"] / "models")]
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(folders, pool.map(lambda folder: run(uvicorn_command(free_port()), cwd=folder), folders.values()), strict=True))
    for case, result in results.items():
        line = _assert_one_line_failure(result, case)
        for word in expected[case]:
            assert word in line, (case, word, line)


def test_generate_serve_refuses_a_bad_schema_in_one_line(make_policy_dir: MakePolicyDir, tmp_path: Path) -> None:
    folder = make_policy_dir(BAD_SCHEMAS["unknown-type"], mlp(6, 4), 6)
    result = run(serve_command(folder, free_port()), cwd=tmp_path)
    line = _assert_one_line_failure(result, "generate.py serve")
    assert str(folder / "schema.yaml") in line and "observations.mouse_col" in line


def test_python_is_the_venv() -> None:
    """The subprocesses run the interpreter these tests run in (with uvicorn installed)."""
    result = run([sys.executable, "-c", "import uvicorn, policy_server; print(policy_server.__file__)"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(REPO)
