"""GET /clients and /clients/{language}: 503 + Retry-After while generating, then the zip; 404 for
an unknown language; 503 naming the fix without Java. Real generator, real servers."""

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import AUTH
from fastapi.testclient import TestClient
from sdk_support import wait_for_zip
from servers import free_port, running_server, uvicorn_command

from policy_server.clients import LANGUAGES


def test_python_sdk_over_http(serve: Callable[..., TestClient], mouse_dir: Path, tmp_path: Path) -> None:
    client = serve(mouse_dir, sdks_in_background=False, sdk_cache_dir=tmp_path / "cache")
    assert client.get("/clients/python").status_code == 401
    unknown = client.get("/clients/cobol", headers=AUTH)
    assert unknown.status_code == 404
    assert all(language in unknown.json()["detail"] for language in LANGUAGES)

    response, waits = wait_for_zip(lambda: client.get("/clients/python/", headers=AUTH))
    assert waits, "a fresh cache cannot have the SDK at once"
    assert all(int(wait.headers["Retry-After"]) > 0 for wait in waits)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    assert any(name.endswith("models/observation.py") for name in archive.namelist())


def test_background_generation_serves_every_language(serve: Callable[..., TestClient], mouse_dir: Path, tmp_path: Path) -> None:
    client = serve(mouse_dir, sdks_in_background=True, sdk_cache_dir=tmp_path / "cache")
    response, _ = wait_for_zip(lambda: client.get("/clients", headers=AUTH))
    assert response.status_code == 200
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(io.BytesIO(response.content)).namelist()}
    assert tops == set(LANGUAGES)


def test_no_java_is_a_503_that_says_what_to_install(mouse_dir: Path, tmp_path: Path) -> None:
    """The server runs with an empty PATH: no java to generate with (python is named by its path)."""
    port = free_port()
    env = {"PATH": str(tmp_path), "POLICY_SERVER_CACHE_DIR": str(tmp_path / "cache")}
    with running_server(uvicorn_command(port), port, cwd=mouse_dir, env=env) as server:
        deadline = time.monotonic() + 30
        response = httpx.get(f"{server.url}/clients/python", headers=AUTH)
        while "Retry-After" in response.headers and time.monotonic() < deadline:  # not yet known
            time.sleep(0.5)
            response = httpx.get(f"{server.url}/clients/python", headers=AUTH)
    assert response.status_code == 503
    assert "Java" in response.json()["detail"] and "Retry-After" not in response.headers
