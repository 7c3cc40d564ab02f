"""Property-based API tests: schemathesis generates requests from the app's own OpenAPI spec.

Three policies (the mouse schema; a tuple policy with an action mask and a list of features; a
continuous policy with means and log-stds), every operation, valid and invalid inputs, with and
without the key. Checks: no 5xx, every answer conforms to the spec (status code and body).
Hypothesis runs derandomized, so a run is reproducible.
"""

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
import torch
from conftest import AUTH, MOUSE_SCHEMA, FixedLogits, MakePolicyDir, TupleOutputs, mlp, settings_for
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from policy_server.server import build_app

TUPLE_MASK_SCHEMA = """\
parameters:
  discrete: true
  tuple: true
  api_key: "1234567asdfgh"
observations:
  actionMask: {type: List[bool], min_items: 5, max_items: 5, description: "allowed actions of both heads"}
  features: {type: List[float], min_items: 3, max_items: 3}
  step: {type: int, minimum: 0, maximum: 1000}
actions:
  - {name: move, n: 2, labels: [left, right]}
  - {name: speed, n: 3}
"""

CONTINUOUS_SCHEMA = """\
parameters:
  discrete: false
  api_key: "1234567asdfgh"
observations:
  angle: {type: float, minimum: -3.2, maximum: 3.2, description: "pole angle"}
  velocity: {type: float}
  flags: {type: List[int], min_items: 2, max_items: 2}
actions:
  - {name: torque, size: 2, low: -2.0, high: 2.0}
"""

SDK_OPERATIONS = {"clients", "client"}
PROTECTED = {"predict", "predict_deterministic", "distribution", "predict_raw", "predict_batch", "schema", "info"}
WITH_KEY_CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
# 401 is not among the statuses FastAPI documents for an operation, so without a key the status check is ours.
WITHOUT_KEY_CHECKS = [not_a_server_error, response_schema_conformance]


def _continuous_model() -> torch.nn.Module:
    """Linear: means from angle and flags, log-stds that grow with velocity (as an unclamped head's can)."""
    weight = torch.zeros(4, 4)
    weight[0, 0] = weight[2, 1] = 1.0  # means: angle, flags[0]
    weight[1, 2] = weight[1, 3] = 0.5  # log-stds: velocity / 2
    weight[3, 0] = 0.25
    return FixedLogits(weight, torch.tensor([0.0, 0.0, -1.0, -1.0]))


def _settings(max_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return hypothesis.settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing case is reported as found
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def _run_operation(operation: Any, mode: GenerationMode, max_examples: int, with_key: bool, seen: dict[int, int]) -> None:
    checks = WITH_KEY_CHECKS if with_key else WITHOUT_KEY_CHECKS
    protected = operation.definition.raw.get("operationId") in PROTECTED

    @_settings(max_examples)
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        headers = dict(AUTH) if with_key else {}
        if not with_key and case.headers:
            case.headers = {k: v for k, v in case.headers.items() if k.lower() not in ("access-token", "authorization")}
        response = case.call(headers=headers)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if not with_key and protected:
            assert response.status_code in (401, 404, 405, 413, 415, 422), (response.status_code, response.text)
        case.validate_response(response, checks=checks, headers=headers)

    run()


def _operations(schema: Any) -> list[Any]:
    """Every operation but /clients, which answers 503 by design while Java generates the SDKs
    (tests/test_clients_http.py covers it)."""
    operations = [result.ok() for result in schema.get_all_operations()]
    return [op for op in operations if op.definition.raw.get("operationId") not in SDK_OPERATIONS]


def _fuzz(app: Any, positive: int = 50, negative: int = 15, without_key: int = 5) -> dict[int, int]:
    """Every operation: `positive` valid and `negative` invalid cases with the key, a few without.
    Returns how often each status was seen; fails listing every operation that broke a check."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    seen: dict[int, int] = {}
    operations = _operations(schema)
    assert len(operations) >= 9
    try:
        for operation in operations:
            has_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
            runs = [(GenerationMode.POSITIVE, positive, True), (GenerationMode.POSITIVE, without_key, False)]
            if has_input:
                runs.append((GenerationMode.NEGATIVE, negative, True))
            for mode, examples, with_key in runs:
                try:
                    _run_operation(operation, mode, examples, with_key, seen)
                except (Exception, BaseExceptionGroup) as error:  # collect them all, then fail once
                    failures.append(f"{operation.label} [{mode.value}, key={with_key}]: {type(error).__name__}: {error}")
    finally:
        shutdown_lifespans()  # stop the executors schemathesis started
    assert not failures, "\n\n".join(failures)
    assert not any(status >= 500 for status in seen), seen
    return seen


@pytest.fixture
def no_lifespans_left() -> Iterator[None]:
    yield
    shutdown_lifespans()


def test_mouse_policy(mouse_dir: Path, no_lifespans_left: None) -> None:
    seen = _fuzz(build_app(settings_for(mouse_dir)))
    assert seen.get(200, 0) > 100 and seen.get(422, 0) > 20 and seen.get(401, 0) > 10, seen


def test_tuple_policy_with_a_mask(make_policy_dir: MakePolicyDir, no_lifespans_left: None) -> None:
    folder = make_policy_dir(TUPLE_MASK_SCHEMA, TupleOutputs(9, [2, 3]), 9)
    seen = _fuzz(build_app(settings_for(folder)))
    assert seen.get(200, 0) > 100 and seen.get(422, 0) > 20, seen


def test_tuple_policy_every_mask(serve: Callable[..., Any], make_policy_dir: MakePolicyDir) -> None:
    """All 32 masks: 422 exactly when a head has no allowed action, never a 500; masked actions never chosen."""
    client = serve(make_policy_dir(TUPLE_MASK_SCHEMA, TupleOutputs(9, [2, 3]), 9))
    for bits in itertools.product([False, True], repeat=5):
        mask = list(bits)
        blocked = not any(mask[:2]) or not any(mask[2:])
        body = {"actionMask": mask, "features": [0.5, -1.0, 2.0], "step": 3}
        for path in ("/predict", "/predict_deterministic", "/distribution"):
            response = client.post(path, json=body, headers=AUTH)
            assert response.status_code == (422 if blocked else 200), (mask, path, response.text)
            if blocked:
                assert isinstance(response.json()["detail"], list)
            elif path == "/distribution":
                heads = response.json()["heads"]
                probabilities = heads[0]["probabilities"] + heads[1]["probabilities"]
                assert [p > 0 for p in probabilities] == mask
            else:
                move, speed = response.json()["actions"]
                assert mask[move] and mask[2 + speed]
        raw = client.post("/predict_raw", json={"obs": [float(b) for b in mask] + [0.5, -1.0, 2.0, 3.0]}, headers=AUTH)
        assert raw.status_code == (422 if blocked else 200), (mask, raw.text)


def test_continuous_policy(make_policy_dir: MakePolicyDir, no_lifespans_left: None) -> None:
    folder = make_policy_dir(CONTINUOUS_SCHEMA, _continuous_model(), 4)
    seen = _fuzz(build_app(settings_for(folder)))
    assert seen.get(200, 0) > 100 and seen.get(422, 0) > 20, seen


def test_policy_without_observations(make_policy_dir: MakePolicyDir, no_lifespans_left: None) -> None:
    """Only /predict_raw and the service routes: the original's schemas without `observations`."""
    schema_text = MOUSE_SCHEMA.split("observations:")[0]
    folder = make_policy_dir(schema_text, mlp(6, 4), 6)
    app = build_app(settings_for(folder))
    paths = set(app.openapi()["paths"])
    assert "/predict_raw" in paths and "/predict" not in paths
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    try:
        for operation in _operations(schema):
            try:
                _run_operation(operation, GenerationMode.POSITIVE, 30, True, {})
            except (Exception, BaseExceptionGroup) as error:
                failures.append(f"{operation.label}: {error}")
    finally:
        shutdown_lifespans()
    assert not failures, "\n\n".join(failures)
