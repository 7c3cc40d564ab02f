"""The HTTP surface (DESIGN.md sections 4, 4.2, 4.3, 4.5): routes, paths, auth, errors, OpenAPI.

Real apps from real model files on disk (`build_app`), driven through Starlette's TestClient with
the lifespan running. Only the /ready-before-start test uses a fake executor.
"""

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import API_KEY, AUTH, MOUSE_OBSERVATION, MOUSE_SCHEMA, FixedLogits, MakePolicyDir, mlp, save_model, settings_for
from fastapi.testclient import TestClient
from servers import REPO, Server, free_port, running_server, uvicorn_command

from policy_server.errors import ConfigError
from policy_server.http.app import Limits, create_app
from policy_server.lifecycle import Registry
from policy_server.policy import Result, Task
from policy_server.server import build_app
from policy_server.settings import Settings

PREFIXED_SCHEMA = MOUSE_SCHEMA.replace('  api_key: "1234567asdfgh"\n', '  api_key: "1234567asdfgh"\n  url_path: api/v1\n')
assert "url_path: api/v1" in PREFIXED_SCHEMA

LISTS_SCHEMA = """\
parameters:
  discrete: true
  api_key: "1234567asdfgh"
observations:
  features: {type: List[float], min_items: 3, max_items: 3, description: "three sensor readings"}
  actionMask: {type: List[bool], min_items: 4, max_items: 4}
  count: {type: int, minimum: 0, maximum: 10}
actions:
  - {name: move, n: 4}
"""
LISTS_OBSERVATION = {"features": [0.1, 0.2, 0.3], "actionMask": [True, True, False, True], "count": 3}

NO_KEY_SCHEMA = MOUSE_SCHEMA.replace('  api_key: "1234567asdfgh"\n', "")
assert "api_key" not in NO_KEY_SCHEMA

OTHER_KEY = "override-Key-9876"


def _linear_mouse() -> torch.nn.Module:
    """logits = [mouse_row_distance, mouse_col_distance, cheese_row, cheese_col]: the best action is known."""
    weight = torch.zeros(6, 4)
    for action in range(4):
        weight[2 + action, action] = 1.0
    return FixedLogits(weight, torch.zeros(4))


def _softmax(logits: list[float]) -> list[float]:
    peak = max(logits)
    weights = [math.exp(x - peak) for x in logits]
    return [w / sum(weights) for w in weights]


def _folder(root: Path, schema: str, module: torch.nn.Module, input_size: int) -> Path:
    root.mkdir(parents=True)
    (root / "schema.yaml").write_text(schema)
    save_model(module, root / "models" / "model.pt2", input_size)
    return root


@pytest.fixture(scope="module")
def prefixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The mouse policy with `url_path: api/v1` and a linear model whose decisions are known."""
    folder = _folder(tmp_path_factory.mktemp("api") / "prefixed", PREFIXED_SCHEMA, _linear_mouse(), 6)
    with TestClient(build_app(settings_for(folder)), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def lists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A policy with fixed-length lists and an action mask."""
    folder = _folder(tmp_path_factory.mktemp("api") / "lists", LISTS_SCHEMA, mlp(8, 4), 8)
    with TestClient(build_app(settings_for(folder)), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def small_body(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The mouse policy with a body limit of 300 bytes."""
    folder = _folder(tmp_path_factory.mktemp("api") / "small", MOUSE_SCHEMA, mlp(6, 4), 6)
    with TestClient(build_app(settings_for(folder, max_body_bytes=300)), raise_server_exceptions=False) as client:
        yield client


# --- every route, with and without a slash, with and without the prefix ---------------------------------

RAW_OBS = {"obs": [1.0, 2.0, 0.0, 1.0, 1.0, 3.0]}
POST_ROUTES: dict[str, Any] = {
    "/predict": MOUSE_OBSERVATION,
    "/predict_deterministic": MOUSE_OBSERVATION,
    "/distribution": MOUSE_OBSERVATION,
    "/predict_raw": RAW_OBS,
    "/predict_batch": {"observations": [MOUSE_OBSERVATION, MOUSE_OBSERVATION]},
}
GET_JSON_ROUTES = ["/schema", "/info", "/health", "/ready", "/openapi.json"]
GET_HTML_ROUTES = ["/docs", "/redoc"]
PROTECTED = [*POST_ROUTES, "/schema", "/info"]
PUBLIC = ["/health", "/ready", "/docs", "/redoc", "/openapi.json"]


def _variants(path: str) -> list[str]:
    return [path, path + "/", "/api/v1" + path, "/api/v1" + path + "/"]


def _check_decision(body: Any) -> None:
    assert set(body) == {"actions", "probability"}
    assert isinstance(body["actions"], list) and len(body["actions"]) == 1
    assert isinstance(body["actions"][0], int) and 0 <= body["actions"][0] < 4
    assert isinstance(body["probability"], float) and 0 < body["probability"] <= 1


@pytest.mark.parametrize("path", [v for p in POST_ROUTES for v in _variants(p)])
def test_post_routes_answer_directly_on_every_path(prefixed: TestClient, path: str) -> None:
    route = "/" + path.removeprefix("/api/v1").strip("/")
    response = prefixed.post(path, json=POST_ROUTES[route], headers=AUTH, follow_redirects=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if route == "/distribution":
        assert [head["name"] for head in body["heads"]] == ["move"]
    elif route == "/predict_batch":
        assert len(body["results"]) == 2
        for result in body["results"]:
            _check_decision(result)
    else:
        _check_decision(body)


@pytest.mark.parametrize("path", [v for p in GET_JSON_ROUTES for v in _variants(p)])
def test_get_json_routes_answer_directly_on_every_path(prefixed: TestClient, path: str) -> None:
    response = prefixed.get(path, headers=AUTH, follow_redirects=False)
    assert response.status_code == 200, response.text
    assert isinstance(response.json(), dict)


@pytest.mark.parametrize("path", [v for p in GET_HTML_ROUTES for v in _variants(p)])
def test_docs_pages_answer_directly_on_every_path(prefixed: TestClient, path: str) -> None:
    response = prefixed.get(path, follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


def test_docs_assets_are_served_locally(prefixed: TestClient) -> None:
    page = prefixed.get("/docs").text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-assets/{asset}" in page
        assert prefixed.get(f"/docs-assets/{asset}").status_code == 200
    assert prefixed.get("/docs-assets/redoc.standalone.js").status_code == 200


def test_service_answers(prefixed: TestClient) -> None:
    assert prefixed.get("/health").json() == {"status": "ok"}
    assert prefixed.get("/ready").json() == {"status": "ready"}
    info = prefixed.get("/info", headers=AUTH).json()
    assert info["backend"] == "local" and info["auth"] == "on" and info["ready"] is True
    assert info["input_size"] == 6 and info["format"] == "torch.export" and info["model"] == "model.pt2"
    assert [head["name"] for head in info["heads"]] == ["move"]
    schema = prefixed.get("/schema", headers=AUTH).json()
    assert list(schema["observations"]) == list(MOUSE_OBSERVATION)
    assert schema["observations"]["mouse_row"] == {"type": "float", "minimum": 0, "maximum": 4, "description": "row of the mouse"}
    assert schema["parameters"]["url_path"] == "/api/v1"
    assert "api_key" not in json.dumps(schema)


BROWSER_ACCEPT = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.mark.parametrize("path", ["/", "/api/v1", "/api/v1/"])
def test_root_sends_browsers_to_docs(prefixed: TestClient, path: str) -> None:
    response = prefixed.get(path, headers=BROWSER_ACCEPT, follow_redirects=False)
    assert response.status_code in (301, 302, 303, 307, 308)
    location = response.headers["location"]
    assert location.rstrip("/").endswith("/docs")
    assert prefixed.get(location, follow_redirects=False).status_code == 200


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
def test_root_answers_monitors_as_the_original_did(prefixed: TestClient, accept: str | None) -> None:
    """The original server's health check: GET / → 200 and the JSON string "ok", no redirect."""
    response = prefixed.get("/", headers={"accept": accept} if accept else {}, follow_redirects=False)
    assert response.status_code == 200
    assert response.json() == "ok"


def test_prefix_does_not_swallow_similar_paths(prefixed: TestClient) -> None:
    assert prefixed.get("/api/v1x/health", follow_redirects=False).status_code == 404
    assert prefixed.get("/api/health", follow_redirects=False).status_code == 404


# --- the original's clients (section 4.5) ----------------------------------------------------------------


def test_original_client_format(prefixed: TestClient) -> None:
    """POST /predict/ with access-token and a flat object carrying observations the schema does not know."""
    body = {**MOUSE_OBSERVATION, "mouse_row_distance": 5, "agent_id": 17, "reward": 0.5, "actionMask": [True] * 4, "name": "x"}
    response = prefixed.post("/predict/", json=body, headers={"access-token": API_KEY}, follow_redirects=False)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert list(answer) == ["actions", "probability"]
    _check_decision(answer)
    deterministic = prefixed.post("/predict_deterministic/", json=body, headers=AUTH).json()
    assert deterministic["actions"] == [0]  # mouse_row_distance=5 is by far the largest logit
    assert deterministic["probability"] == pytest.approx(_softmax([5, 1, 1, 3])[0])


def test_distribution_is_the_softmax_of_the_logits(prefixed: TestClient) -> None:
    answer = prefixed.post("/distribution", json=MOUSE_OBSERVATION, headers=AUTH).json()
    logits = [MOUSE_OBSERVATION[name] for name in ("mouse_row_distance", "mouse_col_distance", "cheese_row", "cheese_col")]
    assert answer == {
        "heads": [{"name": "move", "labels": ["up", "down", "left", "right"], "probabilities": pytest.approx(_softmax(logits))}]
    }


def test_predict_batch_answers_in_order(prefixed: TestClient) -> None:
    rng = np.random.default_rng(3)
    observations = []
    for _ in range(24):
        values = rng.uniform(-3, 3, size=4).round(3).tolist()
        names = ("mouse_row_distance", "mouse_col_distance", "cheese_row", "cheese_col")
        observations.append({"mouse_row": 1.0, "mouse_col": 2.0, **dict(zip(names, values, strict=True))})
    response = prefixed.post("/predict_batch/?deterministic=true", json={"observations": observations}, headers=AUTH)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    singles = [prefixed.post("/predict_deterministic", json=obs, headers=AUTH).json() for obs in observations]
    assert len({tuple(single["actions"]) for single in singles}) == 4  # the order matters: every action occurs
    assert len(results) == len(observations)
    for result, single, obs in zip(results, singles, observations, strict=True):
        assert set(result) == {"actions", "probability"}
        assert result["actions"] == single["actions"]
        assert result["probability"] == pytest.approx(single["probability"], rel=1e-5)
        logits = [obs["mouse_row_distance"], obs["mouse_col_distance"], obs["cheese_row"], obs["cheese_col"]]
        assert result["actions"] == [int(np.argmax(logits))]


def test_predict_batch_samples_by_default_and_seeds_reproduce(prefixed: TestClient) -> None:
    batch = {"observations": [MOUSE_OBSERVATION] * 8}
    first = prefixed.post("/predict_batch?seed=7", json=batch, headers=AUTH).json()
    again = prefixed.post("/predict_batch?seed=7", json=batch, headers=AUTH).json()
    assert first == again and len(first["results"]) == 8


def test_predict_batch_of_nothing(prefixed: TestClient) -> None:
    response = prefixed.post("/predict_batch", json={"observations": []}, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"results": []}


def test_example_from_the_openapi_spec_is_accepted(prefixed: TestClient) -> None:
    spec = prefixed.get("/openapi.json").json()
    for path in ("/predict", "/predict_deterministic", "/distribution", "/predict_batch"):
        example = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        assert prefixed.post(path, json=example, headers=AUTH).status_code == 200


# --- auth (section 4.2) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{"access-token": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}], ids=["access-token", "bearer"])
@pytest.mark.parametrize("path", PROTECTED)
def test_both_key_headers_are_accepted(prefixed: TestClient, headers: dict[str, str], path: str) -> None:
    response = prefixed.post(path, json=POST_ROUTES[path], headers=headers) if path in POST_ROUTES else prefixed.get(path, headers=headers)
    assert response.status_code == 200, response.text


def _detail_text(response: Any) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


@pytest.mark.parametrize("path", PROTECTED)
def test_missing_key_is_401_and_wrong_key_is_403(prefixed: TestClient, path: str) -> None:
    def call(headers: dict[str, str], query: str = "") -> Any:
        if path in POST_ROUTES:
            return prefixed.post(path + query, json=POST_ROUTES[path], headers=headers)
        return prefixed.get(path + query, headers=headers)

    missing = call({})
    assert missing.status_code == 401
    assert "access-token" in _detail_text(missing)
    assert call({"access-token": ""}).status_code == 401  # an empty header is no key
    for wrong in ({"access-token": API_KEY + "x"}, {"Authorization": "Bearer nope"}, {"access-token": API_KEY.upper()}):
        response = call(wrong)
        assert response.status_code == 403, (wrong, response.text)
        _detail_text(response)
    for query in (f"?access-token={API_KEY}", f"?access_token={API_KEY}", f"?api_key={API_KEY}", f"?token={API_KEY}"):
        response = call({}, query)
        assert response.status_code == 401, (query, response.text)
        _detail_text(response)


def test_wrong_bearer_scheme_is_not_a_key(prefixed: TestClient) -> None:
    response = prefixed.get("/info", headers={"Authorization": f"Basic {API_KEY}"})
    assert response.status_code in (401, 403)
    _detail_text(response)


@pytest.mark.parametrize("path", PUBLIC)
def test_public_routes_need_no_key(prefixed: TestClient, path: str) -> None:
    assert prefixed.get(path, follow_redirects=False).status_code == 200


def test_auth_off_serves_without_a_key_and_warns(
    serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = serve(make_policy_dir(NO_KEY_SCHEMA, mlp(6, 4), 6), auth_enabled=False)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "auth" in r.getMessage().lower()]
    assert warnings, caplog.text
    assert client.post("/predict", json=MOUSE_OBSERVATION).status_code == 200
    assert client.post("/predict", json=MOUSE_OBSERVATION, headers={"access-token": "anything"}).status_code == 200
    assert client.get("/info").json()["auth"] == "off"
    assert client.get("/schema").status_code == 200


def test_auth_off_from_the_environment(make_policy_dir: MakePolicyDir, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    folder = make_policy_dir(NO_KEY_SCHEMA, mlp(6, 4), 6)
    settings = Settings.from_env({"POLICY_SERVER_DIR": str(folder), "POLICY_SERVER_AUTH": "off"})
    assert settings.auth_enabled is False
    with TestClient(build_app(settings)) as client:
        assert client.get("/info").json()["auth"] == "off"
    assert any(r.levelno == logging.WARNING and "auth" in r.getMessage().lower() for r in caplog.records)


def test_inline_budget_from_the_environment(tmp_path: Path) -> None:
    assert Settings.from_env({"POLICY_SERVER_DIR": str(tmp_path)}).inline_budget_ms == 1.0
    assert Settings.from_env({"POLICY_SERVER_INLINE_MS": "0"}).inline_budget_ms == 0.0  # everything off the loop
    assert Settings.from_env({"POLICY_SERVER_INLINE_MS": "2.5"}).inline_budget_ms == 2.5
    for value in ("-1", "soon", "inf"):
        with pytest.raises(
            ConfigError, match=f"POLICY_SERVER_INLINE_MS: '{value}' is not a number ≥ 0; fix: set POLICY_SERVER_INLINE_MS to e.g. 1.0"
        ):
            Settings.from_env({"POLICY_SERVER_INLINE_MS": value})


def test_auth_on_says_so(prefixed: TestClient) -> None:
    assert prefixed.get("/info", headers=AUTH).json()["auth"] == "on"


def test_no_key_anywhere_refuses_to_start(make_policy_dir: MakePolicyDir) -> None:
    folder = make_policy_dir(NO_KEY_SCHEMA, mlp(6, 4), 6)
    with pytest.raises(ConfigError) as raised:
        build_app(settings_for(folder))
    assert "parameters.api_key" in str(raised.value)
    assert "schema.yaml" in str(raised.value)
    with pytest.raises(ConfigError, match=r"parameters\.api_key"):
        build_app(Settings.from_env({"POLICY_SERVER_DIR": str(folder)}))


def test_environment_key_overrides_the_schema(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> None:
    client = serve(make_policy_dir(MOUSE_SCHEMA, mlp(6, 4), 6), api_key=OTHER_KEY)
    assert client.post("/predict", json=MOUSE_OBSERVATION, headers={"access-token": OTHER_KEY}).status_code == 200
    assert client.post("/predict", json=MOUSE_OBSERVATION, headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
    assert client.post("/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 403


def test_environment_key_serves_a_schema_without_one(make_policy_dir: MakePolicyDir) -> None:
    folder = make_policy_dir(NO_KEY_SCHEMA, mlp(6, 4), 6)
    settings = Settings.from_env({"POLICY_SERVER_DIR": str(folder), "POLICY_SERVER_API_KEY": OTHER_KEY})
    with TestClient(build_app(settings)) as client:
        assert client.get("/info", headers={"access-token": OTHER_KEY}).status_code == 200
        assert client.get("/info").status_code == 401


def test_the_key_never_leaks(make_policy_dir: MakePolicyDir, caplog: pytest.LogCaptureFixture) -> None:
    """A session of good and bad calls: the key is in no body, header or server log line."""
    caplog.set_level(logging.DEBUG)
    secret = "S3cret-key-do-not-leak-4711"
    folder = make_policy_dir(MOUSE_SCHEMA.replace(API_KEY, secret), mlp(6, 4), 6)
    good = {"access-token": secret}
    bad_obs = {**MOUSE_OBSERVATION, "mouse_row": "x"}
    with TestClient(build_app(settings_for(folder, max_body_bytes=400)), raise_server_exceptions=False) as client:
        responses = [
            client.get("/schema", headers=good),
            client.get("/info", headers=good),
            client.get("/openapi.json"),
            client.get("/docs"),
            client.get("/redoc"),
            client.post("/predict", json=MOUSE_OBSERVATION, headers=good),
            client.post("/distribution", json=MOUSE_OBSERVATION, headers={"Authorization": f"Bearer {secret}"}),
            client.post("/predict", json=MOUSE_OBSERVATION),
            client.post("/predict", json=MOUSE_OBSERVATION, headers={"access-token": secret + "0"}),
            client.post("/predict", json=MOUSE_OBSERVATION, headers={"access-token": secret[:-1]}),
            client.post(f"/predict?access-token={secret}", json=MOUSE_OBSERVATION),
            client.post("/predict", json=bad_obs, headers=good),
            client.post("/predict_raw", json={"obs": [1.0]}, headers=good),
            client.post("/predict?seed=-1", json=MOUSE_OBSERVATION, headers=good),
            client.post("/predict", content=b"{not json", headers=good),
            client.post("/predict", data={"a": "b"}, headers=good),
            client.post("/predict", content=b"x" * 1000, headers={**good, "content-type": "application/json"}),
            client.get("/nowhere", headers=good),
            client.get("/predict", headers=good),
        ]
    statuses = {r.status_code for r in responses}
    assert {200, 401, 403, 404, 405, 413, 415, 422} <= statuses, statuses
    for response in responses:
        assert secret not in response.text, response.request.url
        assert all(secret not in value for value in response.headers.values())
    # httpx/httpcore are this test's client, not the server.
    server_lines = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert server_lines, "expected the server to log its start"
    for record in server_lines:
        assert secret not in record.getMessage()
        assert secret not in (record.exc_text or "")


# --- errors (section 4.3) --------------------------------------------------------------------------------


def _validation_errors(response: Any) -> list[dict[str, Any]]:
    """A 422 in FastAPI's format: a list of {loc, msg, type}."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    for error in detail:
        assert {"loc", "msg", "type"} <= set(error), error
        assert isinstance(error["loc"], list) and isinstance(error["msg"], str) and isinstance(error["type"], str)
    return detail


def test_404_with_a_json_detail(prefixed: TestClient) -> None:
    for path in ("/nowhere", "/predict/extra", "/api/v2/predict", "/api/v1/nowhere/"):
        response = prefixed.post(path, json=MOUSE_OBSERVATION, headers=AUTH)
        assert response.status_code == 404, path
        assert "/docs" in _detail_text(response)
    assert prefixed.get("/nowhere").status_code == 404


def test_405_with_a_json_detail(prefixed: TestClient) -> None:
    for method, path in (("GET", "/predict"), ("GET", "/predict_batch/"), ("PUT", "/predict"), ("DELETE", "/health"), ("POST", "/info")):
        response = prefixed.request(method, path, headers=AUTH)
        assert response.status_code == 405, (method, path)
        assert method in _detail_text(response)


def test_413_for_a_declared_length_over_the_limit(small_body: TestClient) -> None:
    padded = {**MOUSE_OBSERVATION, "padding": "x" * 400}
    response = small_body.post("/predict", json=padded, headers=AUTH)
    assert response.status_code == 413
    assert "300" in _detail_text(response)
    assert small_body.post("/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 200


def test_413_for_a_streamed_body_over_the_limit(small_body: TestClient) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        text = json.dumps({**MOUSE_OBSERVATION, "padding": "x" * total}).encode()
        for start in range(0, len(text), 64):
            yield text[start : start + 64]

    response = small_body.post("/predict", content=chunks(1000), headers={**AUTH, "content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    _detail_text(response)
    small = small_body.post("/predict", content=chunks(10), headers={**AUTH, "content-type": "application/json"})
    assert small.status_code == 200, small.text


def test_413_on_a_large_batch(small_body: TestClient) -> None:
    response = small_body.post("/predict_batch", json={"observations": [MOUSE_OBSERVATION] * 20}, headers=AUTH)
    assert response.status_code == 413
    _detail_text(response)


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"])
def test_415_for_a_body_that_is_not_json(prefixed: TestClient, content_type: str) -> None:
    response = prefixed.post("/predict", content=json.dumps(MOUSE_OBSERVATION), headers={**AUTH, "content-type": content_type})
    assert response.status_code == 415
    assert "application/json" in _detail_text(response)


def test_415_for_a_form(prefixed: TestClient) -> None:
    response = prefixed.post("/predict", data={k: str(v) for k, v in MOUSE_OBSERVATION.items()}, headers=AUTH)
    assert response.status_code == 415
    _detail_text(response)


def test_a_missing_content_type_is_read_as_json(prefixed: TestClient) -> None:
    response = prefixed.post("/predict", content=json.dumps(MOUSE_OBSERVATION).encode(), headers=AUTH)
    assert "content-type" not in response.request.headers
    assert response.status_code == 200, response.text
    _check_decision(response.json())
    charset = prefixed.post(
        "/predict", content=json.dumps(MOUSE_OBSERVATION), headers={**AUTH, "content-type": "application/json; charset=utf-8"}
    )
    assert charset.status_code == 200


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mouse_row": None}, "mouse_row"),
        ({"mouse_row": "abc"}, "mouse_row"),
        ({"mouse_row": [1]}, "mouse_row"),
        ({"mouse_row": 4.5}, "mouse_row"),
        ({"mouse_col": -0.1}, "mouse_col"),
    ],
    ids=["null", "string", "list", "above-maximum", "below-minimum"],
)
def test_422_for_a_bad_value(prefixed: TestClient, change: dict[str, Any], field: str) -> None:
    for path in ("/predict", "/predict_deterministic", "/distribution"):
        errors = _validation_errors(prefixed.post(path, json={**MOUSE_OBSERVATION, **change}, headers=AUTH))
        assert errors[0]["loc"] == ["body", field]


def test_422_for_a_missing_field(prefixed: TestClient) -> None:
    body = {k: v for k, v in MOUSE_OBSERVATION.items() if k != "cheese_col"}
    errors = _validation_errors(prefixed.post("/predict", json=body, headers=AUTH))
    assert errors == [{"loc": ["body", "cheese_col"], "msg": "Field required", "type": "missing"}]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_422_for_nan_and_infinity(prefixed: TestClient, literal: str) -> None:
    text = json.dumps(MOUSE_OBSERVATION).replace('"mouse_row_distance": 0', f'"mouse_row_distance": {literal}')
    assert literal in text
    errors = _validation_errors(prefixed.post("/predict", content=text, headers={**AUTH, "content-type": "application/json"}))
    assert errors[0]["loc"] == ["body", "mouse_row_distance"]
    raw = '{"obs": [1, 2, 0, %s, 1, 3]}' % literal  # noqa: UP031
    _validation_errors(prefixed.post("/predict_raw", content=raw, headers=AUTH))
    batch = '{"observations": [%s]}' % text  # noqa: UP031
    _validation_errors(prefixed.post("/predict_batch", content=batch, headers=AUTH))


def test_422_for_a_value_beyond_float32(prefixed: TestClient) -> None:
    errors = _validation_errors(prefixed.post("/predict", json={**MOUSE_OBSERVATION, "cheese_row": 1e39}, headers=AUTH))
    assert errors[0]["loc"][0] == "body"
    _validation_errors(prefixed.post("/predict_raw", json={"obs": [1, 2, 0, 1e39, 1, 3]}, headers=AUTH))


@pytest.mark.parametrize(
    "body", [b"", b"{", b"[]", b"null", b'"text"', b"{} {}"], ids=["empty", "truncated", "array", "null", "string", "two"]
)
def test_422_for_a_body_that_is_no_observation(prefixed: TestClient, body: bytes) -> None:
    _validation_errors(prefixed.post("/predict", content=body, headers={**AUTH, "content-type": "application/json"}))


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"mouse_row": "\xe9"}', b"\x1c\xef_\xd2\x06"], ids=["bom", "latin-1", "binary"])
def test_422_for_a_body_that_is_not_utf8(prefixed: TestClient, body: bytes) -> None:
    """Not JSON text at all: still FastAPI's 422 list (400 is not among the documented answers)."""
    for path in ("/predict", "/predict_raw", "/predict_batch"):
        _validation_errors(prefixed.post(path, content=body, headers={**AUTH, "content-type": "application/json"}))


@pytest.fixture(scope="module")
def mouse_server() -> Iterator[Server]:
    """`uvicorn app:app` serving examples/mouse_and_cheese."""
    port = free_port()
    with running_server(uvicorn_command(port), port, cwd=REPO / "examples" / "mouse_and_cheese") as server:
        yield server


DEEP = 100_000
UNPARSABLE = {
    "a 5,000-digit integer": ("digits", b'{"obs": [1, 2, 0, 1, 1, 1' + b"0" * 4999 + b"]}"),
    "100k-deep nesting": ("nested", b'{"obs": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
}


@pytest.mark.parametrize("lane", ["fast lane", "FastAPI"])
@pytest.mark.parametrize("path", ["/predict", "/predict_raw", "/predict_batch"])
@pytest.mark.parametrize("case", list(UNPARSABLE))
def test_422_for_json_too_large_to_parse(mouse_server: Server, case: str, path: str, lane: str) -> None:
    """What the parsers refuse (an integer of over 4,300 digits, nesting past the recursion limit)
    is FastAPI's 422 list saying what is wrong, not a 400. `?via=fastapi` keeps it off the fast lane."""
    word, body = UNPARSABLE[case]
    query = "?seed=1" if lane == "fast lane" else "?seed=1&via=fastapi"
    response = httpx.post(f"{mouse_server.url}{path}{query}", content=body, headers={**AUTH, "content-type": "application/json"})
    errors = _validation_errors(response)
    assert errors[0]["loc"] == ["body"] and word in errors[0]["msg"], errors


CONTINUOUS_SCHEMA = """\
parameters:
  discrete: false
  api_key: "1234567asdfgh"
observations:
  angle: {type: float, minimum: -3.2, maximum: 3.2}
  velocity: {type: float}
actions:
  - {name: torque, size: 1, low: -2.0, high: 2.0}
"""


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("velocity", [0.5, 800.0, 1e6, 1e30])
def test_a_valid_observation_never_gets_a_500(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir, velocity: float) -> None:
    """A continuous policy whose log-std grows with the input (an unclamped linear head): the model's
    outputs are finite for every finite input, so every valid observation gets an answer, in JSON."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # mean = angle, log-std = velocity
    client = serve(make_policy_dir(CONTINUOUS_SCHEMA, FixedLogits(weight, torch.zeros(2)), 2))
    body = {"angle": 0.5, "velocity": velocity}
    for path in ("/predict", "/predict_deterministic", "/distribution"):
        response = client.post(path, json=body, headers=AUTH)
        assert response.status_code in (200, 422), (path, response.status_code, response.text)
        answer = _strict_json(response.text)
        if response.status_code == 200 and path != "/distribution":
            assert -2.0 <= answer["actions"][0] <= 2.0
    assert client.post("/predict_deterministic", json=body, headers=AUTH).json()["actions"] == [0.5]


def test_overflowing_logits_are_answered_in_json(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> None:
    """Finite inputs whose logits overflow float32 (a linear model): an answer in strict JSON, no 500."""
    weight = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    schema = 'parameters: {discrete: true, api_key: "1234567asdfgh"}\nobservations:\n  x: {type: float}\n  y: {type: float}\n'
    client = serve(make_policy_dir(schema, FixedLogits(weight, torch.zeros(2)), 2))
    for path in ("/predict", "/predict_deterministic", "/distribution"):
        response = client.post(path, json={"x": 3e38, "y": 3e38}, headers=AUTH)
        assert response.status_code in (200, 422), (path, response.text)
        _strict_json(response.text)


@pytest.mark.parametrize("features", [[0.1, 0.2], [0.1, 0.2, 0.3, 0.4], []], ids=["short", "long", "empty"])
def test_422_for_a_list_of_the_wrong_length(lists: TestClient, features: list[float]) -> None:
    errors = _validation_errors(lists.post("/predict", json={**LISTS_OBSERVATION, "features": features}, headers=AUTH))
    assert errors[0]["loc"] == ["body", "features"]
    mask_errors = _validation_errors(lists.post("/predict", json={**LISTS_OBSERVATION, "actionMask": [True] * 5}, headers=AUTH))
    assert mask_errors[0]["loc"] == ["body", "actionMask"]


def test_lists_schema_serves(lists: TestClient) -> None:
    answer = lists.post("/distribution", json=LISTS_OBSERVATION, headers=AUTH).json()
    assert answer["heads"][0]["probabilities"][2] == 0.0
    for path in ("/predict", "/predict_deterministic"):
        response = lists.post(path, json=LISTS_OBSERVATION, headers=AUTH)
        assert response.status_code == 200 and response.json()["actions"] != [2]


def test_422_for_a_mask_that_allows_nothing(lists: TestClient) -> None:
    blocked = {**LISTS_OBSERVATION, "actionMask": [False] * 4}
    for path in ("/predict", "/predict_deterministic", "/distribution"):
        _validation_errors(lists.post(path, json=blocked, headers=AUTH))
    _validation_errors(lists.post("/predict_batch", json={"observations": [LISTS_OBSERVATION, blocked]}, headers=AUTH))
    _validation_errors(lists.post("/predict_raw", json={"obs": [0.1, 0.2, 0.3, 0, 0, 0, 0, 3]}, headers=AUTH))


@pytest.mark.parametrize("obs", [[1.0] * 5, [1.0] * 7, [], [1.0] * 100], ids=["5", "7", "0", "100"])
def test_422_for_a_raw_vector_of_the_wrong_length(prefixed: TestClient, obs: list[float]) -> None:
    _validation_errors(prefixed.post("/predict_raw", json={"obs": obs}, headers=AUTH))


@pytest.mark.parametrize("seed", ["-1", "abc", "1.5", str(2**64)])
def test_422_for_a_bad_seed(prefixed: TestClient, seed: str) -> None:
    for path in ("/predict", "/predict_raw"):
        body = MOUSE_OBSERVATION if path == "/predict" else RAW_OBS
        errors = _validation_errors(prefixed.post(f"{path}?seed={seed}", json=body, headers=AUTH))
        assert errors[0]["loc"] == ["query", "seed"]
    _validation_errors(prefixed.post(f"/predict_batch?seed={seed}", json={"observations": [MOUSE_OBSERVATION]}, headers=AUTH))


def test_seed_reproduces(prefixed: TestClient) -> None:
    body = {**MOUSE_OBSERVATION, "mouse_row_distance": 1, "cheese_col": 1}
    answers = [prefixed.post(f"/predict?seed={seed}", json=body, headers=AUTH).json() for seed in range(30)]
    again = [prefixed.post(f"/predict?seed={seed}", json=body, headers=AUTH).json() for seed in range(30)]
    assert answers == again
    assert len({tuple(a["actions"]) for a in answers}) > 1  # the seed does change the draw
    big = prefixed.post(f"/predict?seed={2**64 - 1}", json=body, headers=AUTH)
    assert big.status_code == 200


# --- /ready before the executor is ready -----------------------------------------------------------------


class FakeExecutor:
    """Not ready until start() (or the test) says so."""

    backend = "fake"
    starts_in_background = False

    def __init__(self) -> None:
        self.ready = False
        self.started = False

    async def start(self) -> None:
        self.started = True
        self.ready = True

    async def stop(self) -> None:
        self.ready = False

    async def run(self, task: Task) -> Result:
        raise AssertionError("not called in these tests")

    def describe(self) -> dict[str, Any]:
        return {"model": "fake.pt2", "format": "fake", "device": "cpu", "input_size": 6, "heads": [], "backend": "fake", "replicas": 1}


def test_ready_is_503_until_the_executor_is_ready(make_policy_dir: MakePolicyDir) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA, mlp(6, 4), 6)
    executor = FakeExecutor()
    registry = Registry(folder, lambda version, metrics: executor, max_queue=8)
    registry.load()
    app = create_app(registry, auth_on=True, limits=Limits(max_body_bytes=1024, drain_timeout_s=1.0), api_key=API_KEY)
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: start() is not called
    for path in ("/ready", "/ready/"):
        response = client.get(path)
        assert response.status_code == 503
        _detail_text(response)
    assert client.get("/health").status_code == 200
    assert client.get("/info", headers=AUTH).json()["ready"] is False
    executor.ready = True
    assert client.get("/ready").status_code == 200
    executor.ready = False
    with TestClient(app) as started:
        assert executor.started
        assert started.get("/ready").status_code == 200
        assert started.get("/info", headers=AUTH).json()["ready"] is True


def test_ready_after_a_real_start(mouse: TestClient) -> None:
    assert mouse.get("/ready").status_code == 200
    assert mouse.post("/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 200


# --- OpenAPI ---------------------------------------------------------------------------------------------


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _request_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    return _resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


def test_openapi_shows_fields_types_bounds_and_descriptions(prefixed: TestClient) -> None:
    spec = prefixed.get("/openapi.json").json()
    observation = _request_schema(spec, "/predict")
    assert set(observation["required"]) == set(MOUSE_OBSERVATION)
    properties = observation["properties"]
    assert list(properties) == list(MOUSE_OBSERVATION)
    row = properties["mouse_row"]
    assert row["type"] == "number" and row["minimum"] == 0 and row["maximum"] == 4
    assert row["description"] == "row of the mouse"
    assert row["examples"] and 0 <= row["examples"][0] <= 4
    float32_max = float(np.finfo(np.float32).max)  # unbounded: what the server takes, float32's range
    assert (properties["cheese_row"]["minimum"], properties["cheese_row"]["maximum"]) == (-float32_max, float32_max)
    example = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert set(example) == set(MOUSE_OBSERVATION)
    assert spec["info"]["title"] and "access-token" in spec["info"]["description"]


def test_openapi_shows_list_lengths_and_item_types(lists: TestClient) -> None:
    spec = lists.get("/openapi.json").json()
    properties = _request_schema(spec, "/predict")["properties"]
    features = properties["features"]
    assert features["type"] == "array" and features["items"]["type"] == "number"
    assert features["minItems"] == 3 and features["maxItems"] == 3
    assert features["description"] == "three sensor readings"
    mask = properties["actionMask"]
    assert mask["items"]["type"] == "boolean" and mask["minItems"] == 4 and mask["maxItems"] == 4
    assert "mask" in mask["description"].lower()
    count = properties["count"]
    assert count["type"] == "integer" and count["minimum"] == 0 and count["maximum"] == 10


def _raw_vector_schema(client: TestClient) -> dict[str, Any]:
    spec = client.get("/openapi.json").json()
    return dict(_request_schema(spec, "/predict_raw")["properties"]["obs"])


def test_openapi_declares_the_raw_vector_length_from_the_schema(prefixed: TestClient) -> None:
    obs = _raw_vector_schema(prefixed)
    assert obs["minItems"] == obs["maxItems"] == 6
    assert obs["items"]["type"] == "number"
    valid = prefixed.post("/predict_raw", json={"obs": [0.5] * 6}, headers=AUTH)
    assert valid.status_code == 200, valid.text
    for length in (1, 5, 7):
        errors = _validation_errors(prefixed.post("/predict_raw", json={"obs": [0.5] * length}, headers=AUTH))
        assert errors[0]["loc"] == ["body", "obs"], errors


def test_openapi_declares_the_raw_vector_length_from_the_model(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> None:
    """No observations in the schema: the length is the model's (local backend, known before start)."""
    client = serve(make_policy_dir(MOUSE_SCHEMA.split("observations:")[0], mlp(5, 4), 5))
    obs = _raw_vector_schema(client)
    assert obs["minItems"] == obs["maxItems"] == 5


def test_openapi_declares_where_the_raw_vector_holds_the_mask(lists: TestClient) -> None:
    """features (3), actionMask (4), count: one of columns 3 to 6 must allow an action."""
    obs = _raw_vector_schema(lists)
    allowed = [alternative["prefixItems"] for alternative in obs["anyOf"]]
    assert [len(items) - 1 for items in allowed] == [3, 4, 5, 6]
    assert all(items[-1]["exclusiveMinimum"] > 0.5 and items[:-1] == [{}] * (len(items) - 1) for items in allowed)
    mask = _request_schema(lists.get("/openapi.json").json(), "/predict")["properties"]["actionMask"]
    assert [alternative["prefixItems"][-1] for alternative in mask["anyOf"]] == [{"const": True}] * 4


def test_openapi_shows_the_range_the_server_takes(lists: TestClient) -> None:
    """Unbounded: float32's range for floats, ±(2**53 - 1) for ints; refused just past it."""
    features = _request_schema(lists.get("/openapi.json").json(), "/predict")["properties"]["features"]["items"]
    float32_max = float(np.finfo(np.float32).max)
    assert (features["minimum"], features["maximum"]) == (-float32_max, float32_max)
    past = float(np.nextafter(float32_max, math.inf))
    errors = _validation_errors(lists.post("/predict", json={**LISTS_OBSERVATION, "features": [0.1, past, 0.3]}, headers=AUTH))
    assert errors[0]["type"] == "out_of_range"
    assert lists.post("/predict", json={**LISTS_OBSERVATION, "features": [0.1, float32_max, 0.3]}, headers=AUTH).status_code == 200


def test_openapi_operations_and_security(prefixed: TestClient) -> None:
    spec = prefixed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    by_type = {scheme["type"]: scheme for scheme in schemes.values()}
    assert by_type["apiKey"]["in"] == "header" and by_type["apiKey"]["name"] == "access-token"
    assert by_type["http"]["scheme"].lower() == "bearer"
    operations = {op["operationId"]: (path, op) for path, item in spec["paths"].items() for op in item.values()}
    for operation_id in ("predict", "predict_deterministic", "distribution", "predict_raw", "predict_batch"):
        path, operation = operations[operation_id]
        assert path == "/" + operation_id
        assert {name for requirement in operation["security"] for name in requirement} == set(schemes)
        assert "422" in operation["responses"]
    for public in ("/health", "/ready"):
        assert not spec["paths"][public]["get"].get("security")
    raw = _request_schema(spec, "/predict_raw")
    assert raw["properties"]["obs"]["type"] == "array"
    batch = _request_schema(spec, "/predict_batch")
    item = _resolve(spec, batch["properties"]["observations"]["items"])
    assert item["properties"].keys() == MOUSE_OBSERVATION.keys() | {"episode_id", "agent_id"}  # each may name its episode and agent
    assert set(item["required"]) == MOUSE_OBSERVATION.keys()
    assert "deterministic" in {p["name"] for p in spec["paths"]["/predict_batch"]["post"]["parameters"]}


def test_openapi_without_auth_has_no_security(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> None:
    client = serve(make_policy_dir(NO_KEY_SCHEMA, mlp(6, 4), 6), auth_enabled=False)
    spec = client.get("/openapi.json").json()
    assert not spec["paths"]["/predict"]["post"].get("security")
