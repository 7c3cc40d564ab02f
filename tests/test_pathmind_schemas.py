"""The original server's example schemas load unchanged and answer its clients' calls (DESIGN.md §4.5)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import AUTH, PATHMIND_SCHEMAS, MakePolicyDir, TupleOutputs, mlp, settings_for
from fastapi.testclient import TestClient

from policy_server.errors import ConfigError
from policy_server.schema import load_spec
from policy_server.server import build_app

Serve = Callable[..., TestClient]


@dataclass(frozen=True)
class Case:
    """A model that fits one schema, and one call of the original client's format."""

    model: Callable[[], torch.nn.Module]
    input_size: int
    head_sizes: list[int]
    observation: dict[str, Any] = field(default_factory=dict)  # empty: /predict_raw only
    raw: list[float] | None = None


LPOC_TUPLE_TABLES = [f"table_{i}_node" for i in range(1, 7)] + [f"table_{i}_target_node" for i in range(1, 7)]

CASES: dict[str, Case] = {
    "mouse_and_cheese": Case(
        lambda: mlp(6, 4),
        6,
        [4],
        {"mouse_row": 1, "mouse_col": 2, "mouse_row_distance": 0, "mouse_col_distance": 1, "cheese_row": 1, "cheese_col": 3.5},
    ),
    "lpoc": Case(
        lambda: mlp(11, 4),
        11,
        [4],
        {
            "id": 3,
            "coordinates_0": 2,
            "coordinates_1": 5,
            "has_up_neighbour": True,
            "is_up_free": False,
            "has_right_neighbour": False,
            "is_right_free": True,
            "has_down_neighbour": True,
            "is_down_free": True,
            "has_left_neighbour": False,
            "is_left_free": False,
        },
    ),
    "product_delivery": Case(
        lambda: mlp(24, 6),
        24,
        [6],
        {f"manufacturing_center_{i}_{what}": float(i + 1) for what in ("stock", "total_vehicles", "idle_vehicles") for i in range(3)}
        | {f"distributor_{i}_order_amount": float(i) for i in range(15)},
    ),
    "call_center": Case(
        lambda: TupleOutputs(37, [3, 5]),
        37,
        [3, 5],
        {"currentCall": [0.1] * 5, "callCenters": [0.5] * 20, "links": [1.0] * 10, "hour": 13, "minute": 45.0},
    ),
    # lists without item counts: every table is sent as 2 one-hot values; the .pt2 declares 24
    "lpoc_tuple": Case(
        lambda: TupleOutputs(24, [4, 4, 3]),
        24,
        [4, 4, 3],
        {name: [1, 0] if i % 2 else [0, 1] for i, name in enumerate(LPOC_TUPLE_TABLES)},
    ),
    "simple_stochastic_tuple_action_masking": Case(
        lambda: TupleOutputs(7, [2, 2]),
        7,
        [2, 2],
        {"actionMask": [True, True, False, True], "stateChartState": [0.0, 1.0, 0.5]},
    ),
    "stock": Case(lambda: mlp(5, 3), 5, [3], raw=[1.0, 2.0, 3.0, 4.0, 5.0]),
}

EXTRA = {"someUnknownObservation": [1, 2, 3], "reward": 7.5}


def schema_text(name: str) -> str:
    return (PATHMIND_SCHEMAS / f"{name}.yaml").read_text()


def policy_dir(make_policy_dir: MakePolicyDir, name: str, model_name: str = "model.pt2") -> Path:
    case = CASES[name]
    return make_policy_dir(schema_text(name), case.model().eval(), case.input_size, model_name)


def check_decision(answer: dict[str, Any], head_sizes: list[int]) -> None:
    assert set(answer) == {"actions", "probability"}
    actions, probability = answer["actions"], answer["probability"]
    assert isinstance(actions, list) and len(actions) == len(head_sizes)
    assert all(isinstance(a, int) and 0 <= a < n for a, n in zip(actions, head_sizes, strict=True))
    assert isinstance(probability, float) and 0.0 < probability <= 1.0


def test_every_pathmind_schema_has_a_case() -> None:
    assert sorted(p.stem for p in PATHMIND_SCHEMAS.glob("*.yaml")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schema_loads_unchanged(name: str) -> None:
    spec = load_spec(PATHMIND_SCHEMAS / f"{name}.yaml")
    assert spec.discrete is True
    assert spec.api_key == AUTH["access-token"]
    case = CASES[name]
    if case.raw is not None:
        assert spec.observations is None
    else:
        assert spec.observations is not None
        assert [o.name for o in spec.observations] == list(case.observation)
    assert spec.is_tuple == (len(case.head_sizes) > 1)
    assert spec.actions is None  # head sizes come from the model
    assert spec.url_path == ("/api/v1" if name == "call_center" else None)
    assert spec.action_mask == ("actionMask" if name == "simple_stochastic_tuple_action_masking" else None)


def test_observation_widths() -> None:
    widths = {name: load_spec(PATHMIND_SCHEMAS / f"{name}.yaml").input_size for name in CASES}
    assert widths == {
        "mouse_and_cheese": 6,
        "lpoc": 11,
        "product_delivery": 24,
        "call_center": 37,
        "lpoc_tuple": None,  # lists without counts: the model says
        "simple_stochastic_tuple_action_masking": 7,
        "stock": None,  # no observations
    }


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.raw is None))
def test_original_client_call(name: str, make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    case = CASES[name]
    client = serve(policy_dir(make_policy_dir, name))
    response = client.post("/predict/", json=case.observation | EXTRA, headers=AUTH)
    assert response.status_code == 200, response.text
    check_decision(response.json(), case.head_sizes)
    info = client.get("/info", headers=AUTH).json()
    assert info["input_size"] == case.input_size
    assert [head["n"] for head in info["heads"]] == case.head_sizes


def test_stock_serves_predict_raw_only(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    case = CASES["stock"]
    client = serve(policy_dir(make_policy_dir, "stock"))
    assert case.raw is not None
    for path in ("/predict_raw", "/predict_raw/"):
        response = client.post(path, json={"obs": case.raw}, headers=AUTH)
        assert response.status_code == 200, response.text
        check_decision(response.json(), case.head_sizes)
    assert client.post("/predict_raw", json={"obs": case.raw[:4]}, headers=AUTH).status_code == 422
    assert client.post("/predict/", json={"x": 1.0}, headers=AUTH).status_code == 404


def test_call_center_is_served_under_its_url_path(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    case = CASES["call_center"]
    client = serve(policy_dir(make_policy_dir, "call_center"))
    for path in ("/api/v1/predict/", "/api/v1/predict", "/predict/"):
        response = client.post(path, json=case.observation | EXTRA, headers=AUTH)
        assert response.status_code == 200, (path, response.text)
        check_decision(response.json(), case.head_sizes)
    deterministic = client.post("/api/v1/predict_deterministic/", json=case.observation, headers=AUTH)
    assert deterministic.status_code == 200
    check_decision(deterministic.json(), case.head_sizes)
    assert client.post("/api/v1/predict/", json=case.observation).status_code == 401


def test_call_center_probability_is_the_product_of_its_heads(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    case = CASES["call_center"]
    client = serve(policy_dir(make_policy_dir, "call_center"))
    heads = client.post("/api/v1/distribution/", json=case.observation, headers=AUTH).json()["heads"]
    assert [len(head["probabilities"]) for head in heads] == case.head_sizes
    for seed in range(5):
        answer = client.post(f"/api/v1/predict/?seed={seed}", json=case.observation, headers=AUTH).json()
        expected = heads[0]["probabilities"][answer["actions"][0]] * heads[1]["probabilities"][answer["actions"][1]]
        assert answer["probability"] == pytest.approx(expected, rel=1e-12)


def test_lpoc_tuple_checks_each_requests_total(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    case = CASES["lpoc_tuple"]
    client = serve(policy_dir(make_policy_dir, "lpoc_tuple"))
    wrong = {name: [0, 0, 1] for name in LPOC_TUPLE_TABLES}  # 36 values for a model of 24
    response = client.post("/predict/", json=wrong, headers=AUTH)
    assert response.status_code == 422
    assert "24" in response.text and "36" in response.text
    assert client.post("/predict/", json=case.observation, headers=AUTH).status_code == 200


MASKING = "simple_stochastic_tuple_action_masking"


@pytest.mark.parametrize(
    ("mask", "allowed"),
    [
        ([True, False, False, True], [[0], [1]]),
        ([True, True, False, True], [[0, 1], [1]]),
        ([False, True, True, False], [[1], [0]]),
        ([True, True, True, True], [[0, 1], [0, 1]]),
    ],
)
def test_masked_actions_never_come_back(make_policy_dir: MakePolicyDir, serve: Serve, mask: list[bool], allowed: list[list[int]]) -> None:
    client = serve(policy_dir(make_policy_dir, MASKING))
    observation = {"actionMask": mask, "stateChartState": [0.3, -1.0, 2.0]}
    heads = client.post("/distribution/", json=observation, headers=AUTH).json()["heads"]
    assert len(heads) == 2
    for head, (start, allowed_here) in zip(heads, ((0, allowed[0]), (2, allowed[1])), strict=True):
        probabilities = head["probabilities"]
        for action, p in enumerate(probabilities):
            if mask[start + action]:
                assert p > 0.0
            else:
                assert p == 0.0
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-9)
        assert [a for a, p in enumerate(probabilities) if p > 0] == allowed_here
    batch = client.post("/predict_batch?seed=3", json={"observations": [observation] * 300}, headers=AUTH)
    assert batch.status_code == 200
    chosen = [result["actions"] for result in batch.json()["results"]]
    assert all(a in allowed[0] and b in allowed[1] for a, b in chosen)
    for _ in range(5):
        answer = client.post("/predict/", json=observation | EXTRA, headers=AUTH).json()
        assert answer["actions"][0] in allowed[0] and answer["actions"][1] in allowed[1]
    # both allowed actions of a two-way head do come back
    for index in (0, 1):
        if len(allowed[index]) == 2:
            assert {actions[index] for actions in chosen} == {0, 1}


def test_a_fully_masked_head_is_a_422(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(policy_dir(make_policy_dir, MASKING))
    observation = {"actionMask": [True, True, False, False], "stateChartState": [0.0, 0.0, 0.0]}
    for path in ("/predict/", "/predict_deterministic/", "/distribution/"):
        response = client.post(path, json=observation, headers=AUTH)
        assert response.status_code == 422, path
        assert response.json()["detail"][0]["type"] == "no_allowed_action"


@pytest.mark.parametrize("name", ["call_center", MASKING, "lpoc_tuple"])
def test_tuple_schema_with_one_output_tensor_stops_start_up(name: str, make_policy_dir: MakePolicyDir) -> None:
    case = CASES[name]
    folder = make_policy_dir(schema_text(name), mlp(case.input_size, 4), case.input_size)
    with pytest.raises(ConfigError) as info:
        build_app(settings_for(folder))
    message = str(info.value)
    assert info.value.key == "actions"
    assert "\n" not in message
    assert str(folder / "schema.yaml") in message and ": actions: " in message and "fix: " in message


def test_mask_longer_than_the_models_heads_stops_start_up(make_policy_dir: MakePolicyDir) -> None:
    folder = make_policy_dir(schema_text(MASKING), TupleOutputs(7, [2, 3]), 7)
    with pytest.raises(ConfigError) as info:
        build_app(settings_for(folder))
    assert info.value.key == "observations.actionMask"
    assert "\n" not in str(info.value) and "4" in info.value.problem and "5" in info.value.problem
