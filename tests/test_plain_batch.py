"""/predict_batch's plain reader (observations.PlainBatchReader): it takes exactly the bodies the
pydantic model takes, and gives the same rows; anything else is left to the model's 422."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import AUTH, MakePolicyDir, mlp
from fastapi.testclient import TestClient
from pydantic import TypeAdapter, ValidationError

from policy_server.errors import InputError
from policy_server.observations import INT_LIMIT, PlainBatchReader, RowEncoder, batch_model, observation_model
from policy_server.schema import parse_spec

SCHEMA = """\
parameters: {discrete: true, api_key: "1234567asdfgh"}
observations:
  speed: {type: float, minimum: -2.5, maximum: 2.5}
  load: {type: int, minimum: 0, maximum: 10}
  free: {type: float}
actions:
  - {name: move, n: 3}
"""
PLAIN = {"speed": 1.5, "load": 3, "free": -7}


def spec_of(text: str) -> Any:
    return parse_spec(text.encode(), Path("schema.yaml"))


def validated_rows(spec: Any, body: bytes) -> np.ndarray | None:
    """The rows the pydantic path makes of `body`, or None where it answers 422."""
    adapter = TypeAdapter(batch_model(observation_model(spec)))
    try:
        batch = adapter.validate_json(body)
        return RowEncoder(spec).encode(batch.observations) if batch.observations else None
    except (ValidationError, InputError):
        return None


BODIES: list[Any] = [
    {"observations": [PLAIN]},
    {"observations": [PLAIN, {"free": 0.25, "load": 10.0, "speed": -2.5}]},  # keys in another order; a whole float for an int
    {"observations": [PLAIN | {"extra": "ignored"}], "also": "ignored"},
    {"observations": [PLAIN | {"free": INT_LIMIT}]},
    {"observations": [PLAIN | {"free": 1e300}]},  # beyond float32: the model's 422
    {"observations": [PLAIN | {"free": -(INT_LIMIT + 2)}]},
    {"observations": [PLAIN | {"free": 10**30}]},  # an int orjson reads as a float: the model judges
    {"observations": [PLAIN | {"speed": 2.5000001}]},
    {"observations": [PLAIN | {"load": -1}]},
    {"observations": [PLAIN | {"load": 3.5}]},
    {"observations": [PLAIN | {"load": True}]},
    {"observations": [PLAIN | {"speed": "1.5"}]},
    {"observations": [PLAIN | {"speed": None}]},
    {"observations": [PLAIN | {"speed": [1.5]}]},
    {"observations": [{"speed": 1.5, "load": 3}]},
    {"observations": [PLAIN, [1.5, 3, -7]]},
    {"observations": [PLAIN, "x"]},
    {"observations": PLAIN},
    {"observations": "abc"},
    {"observations": []},
    {"nothing": []},
    [PLAIN],
    "text",
]


@pytest.mark.parametrize("body", [json.dumps(b).encode() for b in BODIES] + [b"{", b'{"observations": [{"speed": NaN}]}', b"\xff"])
def test_the_reader_takes_what_the_model_takes_and_gives_its_rows(body: bytes) -> None:
    spec = spec_of(SCHEMA)
    reader = PlainBatchReader.of(spec)
    assert reader is not None
    rows, expected = reader.rows(body), validated_rows(spec, body)
    if expected is None:
        assert rows is None
    elif rows is not None:
        assert rows.dtype == np.float32
        np.testing.assert_array_equal(rows, expected)


def test_plain_bodies_are_read() -> None:
    """The reader is not a no-op: the plainly valid bodies above are read (and equal the model's rows, above)."""
    reader = PlainBatchReader.of(spec_of(SCHEMA))
    assert reader is not None
    read = [json.dumps(body).encode() for body in BODIES[:4]]
    assert all(reader.rows(body) is not None for body in read)


@pytest.mark.parametrize(
    "observations",
    ["  on: {type: bool}\n", "  xs: {type: List[float], min_items: 2, max_items: 2}\n"],
)
def test_schemas_with_bools_or_lists_have_no_plain_reader(observations: str) -> None:
    assert PlainBatchReader.of(spec_of(SCHEMA.replace("  free: {type: float}\n", observations))) is None


def test_a_plain_batch_is_answered_as_the_validated_one(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> None:
    """Over HTTP: the same batch and seed, read plainly (`?seed=`) and by FastAPI (another query
    parameter sends it there), give the same answers; a bad one still gets FastAPI's 422."""
    client = serve(make_policy_dir(SCHEMA, mlp(3, 3), 3))
    batch = {"observations": [PLAIN, PLAIN | {"speed": -1.0, "load": 7}] * 20}
    plain = client.post("/predict_batch?seed=11", json=batch, headers=AUTH)
    validated = client.post("/predict_batch?seed=11&deterministic=false", json=batch, headers=AUTH)
    assert plain.status_code == validated.status_code == 200
    assert plain.json() == validated.json()
    assert len({tuple(r["actions"]) for r in plain.json()["results"]}) > 1  # sampled: not every row the same answer
    refused = client.post("/predict_batch?seed=11", json={"observations": [PLAIN | {"load": 3.5}]}, headers=AUTH)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "observations", 0, "load"]
