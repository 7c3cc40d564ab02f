"""Whatever body a client sends to OIP's infer, the answer is 200 or a 4xx `{"error": ...}`:
never a 500. Hypothesis makes the bodies: well-formed tensors with wrong shapes, datatypes and
values, and arbitrary JSON where a tensor or a parameter should be."""

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import AUTH, REPO
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_server.oip.tensors import DTYPES

EXAMPLE = REPO / "examples" / "tuple_masking"
NAMES = ["queue_lengths", "job_size", "urgency", "energy_price", "actionMask", "obs", "x"]
DATATYPES = [*DTYPES, "BYTES", "FP8", 3]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
numbers = st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
shapes = st.lists(st.integers(-1, 6), max_size=3) | json_values


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(shapes)
    size = 1
    if isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape):
        for n in shape:
            size *= n
    data = draw(st.lists(numbers, min_size=size, max_size=size) if size <= 40 else st.lists(numbers, max_size=5))
    tensor = {"name": draw(st.sampled_from(NAMES)), "shape": shape, "datatype": draw(st.sampled_from(DATATYPES)), "data": data}
    if draw(st.booleans()):
        tensor.pop(draw(st.sampled_from(list(tensor))))
    return tensor


parameters = st.fixed_dictionaries(
    {},
    optional={
        "seed": st.integers(-2, 2**65) | json_values,
        "deterministic": st.booleans() | json_values,
        "sequence_id": st.integers(-2, 10) | st.text(max_size=8),
        "binary_data_output": st.booleans(),
    },
)
bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors(), max_size=6) | json_values},
    optional={
        "parameters": parameters | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["actions", "probability", "machine_probabilities", "value"])}), max_size=3
        )
        | json_values,
        "id": json_values,
    },
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from policy_server.server import build_app
    from policy_server.settings import Settings

    with TestClient(build_app(Settings(policy_dir=EXAMPLE, sdks_in_background=False)), raise_server_exceptions=False) as client:
        yield client


def assert_answered(response: Any) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()) == {"error"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_any_json_body_is_answered_200_or_4xx(client: TestClient, body: dict[str, Any]) -> None:
    assert_answered(client.post("/v2/models/tuple_masking/infer", content=json.dumps(body), headers=AUTH))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    datatype=st.sampled_from(DATATYPES),
    shape=shapes,
    size=st.integers(-3, 80) | json_values,
    raw=st.binary(max_size=80),
    declared=st.integers(-5, 400),
)
def test_any_binary_body_is_answered_200_or_4xx(
    client: TestClient, datatype: Any, shape: Any, size: Any, raw: bytes, declared: int
) -> None:
    header = json.dumps(
        {"inputs": [{"name": "obs", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}]}
    ).encode()
    length = str(declared if declared >= 0 else len(header))
    answer = client.post(
        "/v2/models/tuple_masking/infer", content=header + raw, headers={**AUTH, "Inference-Header-Content-Length": length}
    )
    assert_answered(answer)


def test_a_nan_in_raw_bytes_is_a_400(client: TestClient) -> None:
    raw = struct.pack("<10f", *([0.5] * 9 + [float("nan")]))
    header = json.dumps(
        {"inputs": [{"name": "obs", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}]}
    ).encode()
    answer = client.post(
        "/v2/models/tuple_masking/infer", content=header + raw, headers={**AUTH, "Inference-Header-Content-Length": str(len(header))}
    )
    assert answer.status_code == 400 and "finite" in answer.json()["error"]
