"""/info tells what is served and where: model, file hash, sizes, heads, backend, device, auth."""

import hashlib
from collections.abc import Callable
from pathlib import Path

from conftest import API_KEY, AUTH
from fastapi.testclient import TestClient

from policy_server import __version__


def test_info_describes_the_served_policy(serve: Callable[..., TestClient], mouse_dir: Path) -> None:
    info = serve(mouse_dir).get("/info", headers=AUTH).json()
    model = mouse_dir / "models" / "model.pt2"
    assert info["model"] == "model.pt2"
    assert info["format"] == "torch.export"
    assert info["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert info["input_size"] == 6
    assert info["heads"] == [{"name": "move", "kind": "discrete", "n": 4, "labels": ["up", "down", "left", "right"]}]
    assert (info["backend"], info["device"], info["replicas"], info["gpu_memory"]) == ("local", "cpu", 1, None)
    assert info["version"] == __version__
    assert info["auth"] == "on" and info["ready"] is True
    assert info["uptime_seconds"] >= 0
    assert API_KEY not in str(info)


def test_info_needs_the_key(serve: Callable[..., TestClient], mouse_dir: Path) -> None:
    assert serve(mouse_dir).get("/info").status_code == 401
