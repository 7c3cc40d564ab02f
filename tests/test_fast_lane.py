"""The fast path of PredictionRoute (policy_server/http/routes.py): which requests it answers
itself, which it hands to FastAPI's handler untouched, and that both answer alike on a real app."""

import asyncio
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import AUTH, MOUSE_OBSERVATION, MOUSE_SCHEMA, mlp, save_model, settings_for
from fastapi.testclient import TestClient
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from policy_server.errors import InputError
from policy_server.http.middleware import BodyGuard
from policy_server.http.routes import PredictionRoute
from policy_server.server import build_app

# --- the route alone, FastAPI's handler replaced by an app that records what reaches it ------


class RecordingApp:
    """Stands for FastAPI: records each request it gets, with the body it could read."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        await Response("from the app", status_code=299)(scope, receive, send)


async def _answer(body: dict[str, int], seed: int | None) -> Response:
    if body.get("x") == -1:
        raise InputError(("body",), "x is -1", "minus_one")
    return Response(json.dumps({"answered": body, "seed": seed}), media_type="application/json")


def _call(
    lane: PredictionRoute, body: bytes, headers: dict[str, str], query: bytes = b"", path: str = "/p", method: str = "POST"
) -> Message:
    """One request through the lane; the response's start message, with the body under "body"."""
    sent: list[Message] = []
    chunks = [body[:3], body[3:]]  # the body in two messages, as a server may deliver it

    async def receive() -> Message:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)} if chunks else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
    app = SimpleNamespace(state=SimpleNamespace(body_guard=BodyGuard(1 << 20)))  # what the route reads of its app
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": raw_headers, "app": app}
    asyncio.run(lane.handle(scope, receive, send))
    return sent[0] | {"body": b"".join(m.get("body", b"") for m in sent[1:])}


@pytest.fixture
def inner() -> RecordingApp:
    return RecordingApp()


@pytest.fixture
def lane(inner: RecordingApp) -> PredictionRoute:
    async def endpoint(body: dict[str, int], seed: int | None = None) -> Response:
        return await _answer(body, seed)

    route = PredictionRoute("/p", endpoint, methods=["POST"])
    route.fastapi_app = inner
    return route


def _headers(body: bytes, **extra: str) -> dict[str, str]:
    return {"content-length": str(len(body)), **AUTH, **extra}


def test_a_plain_request_is_answered_without_the_app(lane: PredictionRoute, inner: RecordingApp) -> None:
    body = b'{"x": 1, "y": 2}'
    start = _call(lane, body, _headers(body), query=b"seed=42")
    assert start["status"] == 200 and json.loads(start["body"]) == {"answered": {"x": 1, "y": 2}, "seed": 42}
    assert inner.bodies == []
    assert json.loads(_call(lane, body, _headers(body))["body"])["seed"] is None


@pytest.mark.parametrize(
    ("case", "headers", "query"),
    [
        ("no content-length", dict(AUTH), b""),
        ("another query parameter", None, b"seed=1&deterministic=true"),
        ("a seed that is no number", None, b"seed=abc"),
        ("a seed beyond 2**64-1", None, b"seed=18446744073709551616"),
    ],
)
def test_anything_unusual_goes_to_the_app_with_its_body(
    lane: PredictionRoute, inner: RecordingApp, case: str, headers: dict[str, str] | None, query: bytes
) -> None:
    body = b'{"x": 1, "y": 2}'
    start = _call(lane, body, headers if headers is not None else _headers(body), query=query)
    assert start["status"] == 299, case
    assert inner.bodies in ([body], [body[:3]]), case  # untouched: the app reads it itself


def test_a_body_that_fails_validation_reaches_the_app_whole(lane: PredictionRoute, inner: RecordingApp) -> None:
    body = b'{"x": "one"}'
    assert _call(lane, body, _headers(body))["status"] == 299
    assert inner.bodies == [body]  # read by the lane, replayed in one piece


def test_the_policys_own_errors_are_answered_by_the_lane(lane: PredictionRoute, inner: RecordingApp) -> None:
    body = b'{"x": -1}'
    start = _call(lane, body, _headers(body))
    assert start["status"] == 422 and b"x is -1" in start["body"]
    assert inner.bodies == []


# --- on the real app: the lane and FastAPI give the same answers -----------------------------


@pytest.fixture(scope="module")
def mouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("lane") / "mouse"
    folder.mkdir()
    (folder / "schema.yaml").write_text(MOUSE_SCHEMA)
    save_model(mlp(6, 4, seed=3), folder / "models" / "model.pt2", 6)
    with TestClient(build_app(settings_for(folder))) as client:
        yield client


def _post(client: TestClient, path: str, body: Any, query: str) -> Any:
    response = client.post(f"{path}?{query}", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("path", ["/predict", "/predict_deterministic", "/distribution", "/predict_raw", "/predict_batch"])
def test_the_lane_and_fastapi_answer_alike(mouse: TestClient, path: str) -> None:
    """`&via=fastapi` is a query parameter FastAPI ignores and the lane does not take."""
    if path == "/predict_raw":
        body: Any = {"obs": list(MOUSE_OBSERVATION.values())}
    elif path == "/predict_batch":
        body = {"observations": [MOUSE_OBSERVATION, {**MOUSE_OBSERVATION, "mouse_row": 4}] * 3}
    else:
        body = MOUSE_OBSERVATION
    for seed in (1, 2, 3):
        assert _post(mouse, path, body, f"seed={seed}") == _post(mouse, path, body, f"seed={seed}&via=fastapi")


def test_requests_through_the_lane_are_counted_in_the_metrics(mouse: TestClient) -> None:
    def predicted() -> float:
        lines = mouse.get("/metrics").text.splitlines()
        counted = [line for line in lines if line.startswith("policy_server_requests_total{") and 'route="/predict"' in line]
        return sum(float(line.rsplit(" ", 1)[1]) for line in counted if 'status="200"' in line)

    before = predicted()
    for _ in range(3):
        _post(mouse, "/predict", MOUSE_OBSERVATION, "seed=5")
    assert predicted() == before + 3


# --- strict JSON types, alike on both lanes ------------------------------------------------------

TYPED_SCHEMA = """\
parameters:
  discrete: true
  api_key: "1234567asdfgh"
observations:
  speed: {type: float}
  count: {type: int}
  actionMask: {type: List[bool], min_items: 2, max_items: 2}
"""
TYPED_OBSERVATION = {"speed": 1.5, "count": 2, "actionMask": [True, True]}
LANES = ("seed=1", "seed=1&via=fastapi")  # the lane answers the first; FastAPI the second


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("lane") / "typed"
    folder.mkdir()
    (folder / "schema.yaml").write_text(TYPED_SCHEMA)
    save_model(mlp(4, 2), folder / "models" / "model.pt2", 4)
    with TestClient(build_app(settings_for(folder))) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/predict", {**TYPED_OBSERVATION, "speed": True}, ["body", "speed"]),
        ("/predict", {**TYPED_OBSERVATION, "speed": False}, ["body", "speed"]),
        ("/predict", {**TYPED_OBSERVATION, "speed": "3"}, ["body", "speed"]),
        ("/predict", {**TYPED_OBSERVATION, "count": 2.5}, ["body", "count"]),
        ("/predict", {**TYPED_OBSERVATION, "count": True}, ["body", "count"]),
        ("/predict", {**TYPED_OBSERVATION, "count": "2"}, ["body", "count"]),
        ("/predict", {**TYPED_OBSERVATION, "actionMask": [1, 1]}, ["body", "actionMask", 0]),
        ("/predict", {**TYPED_OBSERVATION, "actionMask": [True, 0]}, ["body", "actionMask", 1]),
        ("/predict", {**TYPED_OBSERVATION, "actionMask": ["yes", "no"]}, ["body", "actionMask", 0]),
        ("/predict", {**TYPED_OBSERVATION, "actionMask": ["true", True]}, ["body", "actionMask", 0]),
        ("/distribution", {**TYPED_OBSERVATION, "speed": True}, ["body", "speed"]),
        (
            "/predict_batch",
            {"observations": [TYPED_OBSERVATION, {**TYPED_OBSERVATION, "speed": "3"}]},
            ["body", "observations", 1, "speed"],
        ),
        ("/predict_raw", {"obs": [1.5, 2, True, 1]}, ["body", "obs", 2]),
        ("/predict_raw", {"obs": [1.5, "2", 1, 1]}, ["body", "obs", 1]),
    ],
)
def test_only_the_json_types_of_the_spec_are_taken_on_both_lanes(typed: TestClient, path: str, body: Any, loc: list[Any]) -> None:
    """Floats take JSON numbers, never booleans or strings; ints take integers; bools take only true and false."""
    for query in LANES:
        response = typed.post(f"{path}?{query}", json=body, headers=AUTH)
        assert response.status_code == 422, (query, response.text)
        assert response.json()["detail"][0]["loc"] == loc, (query, response.text)


@pytest.mark.parametrize(
    "change",
    [{"speed": 2}, {"count": 3.0}, {"count": -(2**53 - 1)}, {"speed": 3.4e38}, {"actionMask": [False, True]}],
    ids=["int-for-float", "whole-float-for-int", "int-limit", "float32-range", "bools"],
)
def test_what_the_spec_allows_is_answered_alike_on_both_lanes(typed: TestClient, change: dict[str, Any]) -> None:
    """JSON has one number type: 2 is a float, 3.0 an integer (as JSON Schema says)."""
    answers = [_post(typed, "/predict", {**TYPED_OBSERVATION, **change}, query) for query in LANES]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("count", [2**53, -(2**53), 2**64 + 1, 10**30, 1e16])
def test_an_int_past_the_specs_range_is_refused_on_both_lanes(typed: TestClient, count: float) -> None:
    """±(2**53 - 1), the spec's range for ints: past it, even where orjson reads the number as a float."""
    spec = typed.get("/openapi.json").json()
    shown = spec["components"]["schemas"]["Observation"]["properties"]["count"]
    assert (shown["minimum"], shown["maximum"]) == (-(2**53 - 1), 2**53 - 1)
    for query in LANES:
        response = typed.post(f"/predict?{query}", json={**TYPED_OBSERVATION, "count": count}, headers=AUTH)
        assert response.status_code == 422, (query, response.text)
        assert response.json()["detail"][0]["type"] == "out_of_range"
