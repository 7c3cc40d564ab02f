"""What the SDK tests share: a real `generate.py serve`, its SDK downloaded from /clients as a user
downloads it, and the REST routes' own answers to compare the SDK's with."""

import io
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import AUTH
from servers import REPO, Server, free_port, running_server, serve_command

EXAMPLES = REPO / "examples"
GENERATION_TIMEOUT_S = 180
SEED = 7
# An observation of the default example and of the one with list fields, a mask and two heads, as a
# user's simulation would send them (floats where the schema says float).
OBSERVATIONS: dict[str, dict[str, Any]] = {
    "mouse_and_cheese": {
        "mouse_row": 1.0,
        "mouse_col": 2.0,
        "mouse_row_distance": 0.0,
        "mouse_col_distance": 1.0,
        "cheese_row": 1.0,
        "cheese_col": 3.0,
    },
    "tuple_masking": {
        "queue_lengths": [1.0, 4.0],
        "job_size": 1.0,
        "urgency": 0.5,
        "energy_price": 0.2,
        "actionMask": [True, True, True, False, True],
    },
}


def wait_for_zip(get: Callable[[], httpx.Response]) -> tuple[httpx.Response, list[httpx.Response]]:
    """Poll until the answer is not 503; return it and the 503s seen before it."""
    waits: list[httpx.Response] = []
    deadline = time.monotonic() + GENERATION_TIMEOUT_S
    while time.monotonic() < deadline:
        response = get()
        if response.status_code != 503:
            return response, waits
        waits.append(response)
        time.sleep(1)
    raise AssertionError("the SDKs were not generated in time")


@contextmanager
def example_server(example: str) -> Iterator[Server]:
    """`generate.py serve` on examples/`example`, as the README starts it (h2c upgrades and all)."""
    port = free_port()
    with running_server(serve_command(EXAMPLES / example, port), port, cwd=REPO) as server:
        yield server


def download_sdk(server: Server, language: str, into: Path) -> Path:
    """GET /clients/`language` (waiting while it is generated), unzipped into `into`; its folder."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30.0) as client:
        response, _ = wait_for_zip(lambda: client.get(f"/clients/{language}"))
    assert response.status_code == 200, response.text
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(into)
    return into / language


def rest_answers(server: Server, observation: dict[str, Any]) -> dict[str, Any]:
    """What the REST routes answer to what the SDK programs ask: predict with SEED, predict_deterministic,
    predict_batch of two observations with SEED, distribution."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30.0) as client:
        answers = {
            "predict": client.post("/predict", params={"seed": SEED}, json=observation),
            "predict_deterministic": client.post("/predict_deterministic", json=observation),
            "predict_batch": client.post("/predict_batch", params={"seed": SEED}, json={"observations": [observation, observation]}),
            "distribution": client.post("/distribution", json=observation),
        }
    for route, answer in answers.items():
        assert answer.status_code == 200, (route, answer.text)
    return without_nulls({route: answer.json() for route, answer in answers.items()})


def wrong_key_answer(server: Server, observation: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", headers={"access-token": "wrong-key"}, json=observation, timeout=30.0)


def without_nulls(value: Any) -> Any:
    """`value` without its null members, at any depth (an SDK leaves out what the server sends as null)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def approximately(value: Any, rel: float) -> Any:
    """`value` with every float compared to `rel`, at any depth."""
    if isinstance(value, dict):
        return {key: approximately(item, rel) for key, item in value.items()}
    if isinstance(value, list):
        return [approximately(item, rel) for item in value]
    return pytest.approx(value, rel=rel, abs=0) if isinstance(value, float) else value
