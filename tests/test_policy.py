"""Policy math (DESIGN.md §4.1): softmax, masks, sampling statistics, seeds, tuple and continuous heads."""

import json
import logging
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import AUTH, MOUSE_OBSERVATION, MOUSE_SCHEMA, FixedLogits, MakePolicyDir, TupleOutputs, constant_logits, mlp, settings_for
from fastapi.testclient import TestClient
from scipy import special, stats

from policy_server.errors import ConfigError, InputError
from policy_server.loading import load_policy, load_policy_spec
from policy_server.policy import Decisions, Distributions, Kind, Policy, Task, masked_softmax, sample_discrete, uniforms
from policy_server.server import build_app

Serve = Callable[..., TestClient]

KEY = "parameters: {discrete: true, tuple: false, api_key: '1234567asdfgh'}\n"
ONE_X = KEY + "observations:\n  x: {type: float}\n"
MASKED = (
    KEY
    + "observations:\n  actionMask: {type: 'List[bool]', min_items: 4, max_items: 4}\n  x: {type: float}\nactions:\n  - {name: move, n: 4}\n"
)
LOGITS = [1.0, 0.0, -0.5, 2.0, 0.3]


def softmax32(logits: list[float]) -> np.ndarray:
    """The softmax of the logits as a float32 model gives them."""
    return special.softmax(np.asarray(logits, dtype=np.float32).astype(np.float64))


def constant_heads(input_size: int, logits: list[list[float]]) -> torch.nn.Module:
    """One tensor per head, each constant."""
    module = TupleOutputs(input_size, [len(head) for head in logits])
    with torch.no_grad():
        for layer, values in zip(module.heads, logits, strict=True):
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor(values))
    return module


def policy_of(folder: Path) -> Policy:
    return load_policy(folder, load_policy_spec(folder))


def post(client: TestClient, path: str, body: dict[str, Any], status: int = 200) -> Any:
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    return response.json()


def batch_actions(client: TestClient, observation: dict[str, Any], count: int, seed: int, deterministic: bool = False) -> list[list[Any]]:
    query = f"?seed={seed}" + ("&deterministic=true" if deterministic else "")
    results = post(client, "/predict_batch" + query, {"observations": [observation] * count})["results"]
    assert len(results) == count
    return [result["actions"] for result in results]


# --- discrete heads ------------------------------------------------------------------------------


def test_probabilities_are_the_softmax_of_the_logits(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(ONE_X, constant_logits(1, LOGITS), 1))
    heads = post(client, "/distribution", {"x": 0.7})["heads"]
    assert len(heads) == 1 and heads[0]["name"] == "action"
    probabilities = np.array(heads[0]["probabilities"])
    np.testing.assert_allclose(probabilities, softmax32(LOGITS), rtol=0, atol=1e-12)
    assert abs(probabilities.sum() - 1.0) < 1e-9


def test_probabilities_of_a_real_model_are_softmax_and_sum_to_one(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    module = mlp(6, 4, seed=3).eval()
    client = serve(make_policy_dir(MOUSE_SCHEMA, module, 6))
    rng = np.random.default_rng(0)
    for _ in range(5):
        values = rng.uniform(0, 4, size=6).round(3)
        observation = dict(zip(MOUSE_OBSERVATION, values.tolist(), strict=True))
        heads = post(client, "/distribution", observation)["heads"]
        assert heads[0]["labels"] == ["up", "down", "left", "right"]
        with torch.no_grad():
            logits = module(torch.tensor([values], dtype=torch.float32)).numpy()[0]
        probabilities = np.array(heads[0]["probabilities"])
        np.testing.assert_allclose(probabilities, special.softmax(logits.astype(np.float64)), atol=1e-6)
        assert abs(probabilities.sum() - 1.0) < 1e-9


def test_probabilities_sum_to_one_over_many_rows(make_policy_dir: MakePolicyDir) -> None:
    policy = policy_of(make_policy_dir(MOUSE_SCHEMA, mlp(6, 4, seed=1), 6))
    rows = np.random.default_rng(1).normal(0, 50, size=(1000, 6)).astype(np.float32)  # large logits too
    (head,) = policy.parameters(rows)
    assert head.probabilities is not None and head.probabilities.dtype == np.float64
    assert np.all(np.abs(head.probabilities.sum(axis=1) - 1.0) < 1e-9)
    assert np.all(head.probabilities >= 0.0)


def test_extreme_logits_stay_finite() -> None:
    probabilities = masked_softmax(np.array([[1000.0, 0.0, -1000.0], [-800.0, -800.0, -801.0]]), None)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities[0], [1.0, 0.0, 0.0], atol=1e-300)
    assert abs(probabilities[1].sum() - 1.0) < 1e-12 and probabilities[1][0] == probabilities[1][1]


def test_a_nan_logit_of_an_allowed_action_stays_nan_under_a_mask() -> None:
    logits = np.array([[np.nan, 1.0, 2.0], [np.nan, 1.0, 2.0], [np.nan, 1.0, 2.0]])
    mask = np.array([[True, True, False], [False, True, True], [False, False, False]])
    probabilities = masked_softmax(logits, mask)
    assert np.isnan(probabilities[0]).all()  # a model failure, not "nothing allowed"
    np.testing.assert_allclose(probabilities[1], special.softmax([-np.inf, 1.0, 2.0]))  # the NaN is masked out
    assert (probabilities[2] == 0).all()  # nothing allowed


class NaNAbove100(torch.nn.Module):
    """Logits NaN once the last observation exceeds 100: finite at start-up, NaN for such a request."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 4)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(obs) + torch.where(obs[:, 4:] > 100.0, float("nan"), 0.0)


def test_nan_logits_under_a_mask_answer_500_not_no_allowed_action(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(MASKED, NaNAbove100(), 5))
    body = {"actionMask": [True, True, False, True], "x": 1000.0}
    response = client.post("/predict", json=body, headers=AUTH)
    assert response.status_code == 500, response.text
    assert "error id" in response.json()["detail"]
    assert post(client, "/predict", body | {"x": 1.0})["actions"][0] in (0, 1, 3)


def strict_json(text: str) -> Any:
    """Parse as strict JSON (RFC 8259): NaN and Infinity are not JSON, and most clients refuse them."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_an_infinite_logit_gives_valid_probabilities(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    # x = 3e38 is a valid float32 observation; logits 2x, 0, -2x overflow to +inf, 0, -inf
    client = serve(make_policy_dir(ONE_X, FixedLogits(torch.tensor([[2.0, 0.0, -2.0]]), torch.zeros(3)), 1))
    response = client.post("/distribution", json={"x": 3e38}, headers=AUTH)
    assert response.status_code == 200
    assert strict_json(response.text)["heads"][0]["probabilities"] == [1.0, 0.0, 0.0]
    for path in ("/predict", "/predict_deterministic"):
        response = client.post(path, json={"x": 3e38}, headers=AUTH)
        assert response.status_code == 200
        assert strict_json(response.text) == {"actions": [0], "probability": 1.0}


def test_deterministic_is_the_argmax(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    module = mlp(6, 4, seed=5).eval()
    client = serve(make_policy_dir(MOUSE_SCHEMA, module, 6))
    rng = np.random.default_rng(2)
    rows = rng.uniform(0, 4, size=(40, 6)).round(3)
    observations = [dict(zip(MOUSE_OBSERVATION, row.tolist(), strict=True)) for row in rows]
    with torch.no_grad():
        logits = module(torch.tensor(rows, dtype=torch.float32)).numpy().astype(np.float64)
    expected = logits.argmax(axis=1)
    assert len(set(expected.tolist())) > 1, "the test needs observations whose best action differs"
    for observation, best, row_logits in zip(observations[:8], expected, logits, strict=False):
        answer = post(client, "/predict_deterministic", observation)
        assert answer["actions"] == [int(best)]
        assert answer["probability"] == pytest.approx(special.softmax(row_logits).max(), abs=1e-6)
    batch = post(client, "/predict_batch?deterministic=true", {"observations": observations})["results"]
    assert [result["actions"][0] for result in batch] == expected.tolist()


def test_masked_actions_are_zero_and_never_sampled(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(MASKED, constant_logits(5, [0.0, 10.0, 1.0, 10.0]), 5))
    observation = {"actionMask": [True, False, True, False], "x": 0.0}
    probabilities = post(client, "/distribution", observation)["heads"][0]["probabilities"]
    assert probabilities[1] == 0.0 and probabilities[3] == 0.0
    np.testing.assert_allclose(probabilities, [*softmax32([0.0, 1.0])[:1], 0.0, softmax32([0.0, 1.0])[1], 0.0], atol=1e-12)
    drawn = [actions[0] for actions in batch_actions(client, observation, 3000, seed=4)]
    assert set(drawn) == {0, 2}
    assert post(client, "/predict_deterministic", observation)["actions"] == [2]
    for seed in range(10):
        answer = post(client, f"/predict?seed={seed}", observation)
        assert answer["actions"][0] in (0, 2)
        assert answer["probability"] == probabilities[answer["actions"][0]]


def test_mask_stays_in_the_model_input(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    # the logits depend on the mask columns: the model sees them
    weight = torch.zeros(5, 4)
    weight[0, 0] = 5.0  # mask[0] raises the logit of action 0
    client = serve(make_policy_dir(MASKED, FixedLogits(weight, torch.zeros(4)), 5))
    with_flag = post(client, "/distribution", {"actionMask": [True, True, True, True], "x": 0})["heads"][0]["probabilities"]
    assert with_flag[0] == pytest.approx(math.exp(5) / (math.exp(5) + 3), abs=1e-6)


def test_all_masked_head_is_an_input_error(make_policy_dir: MakePolicyDir) -> None:
    policy = policy_of(make_policy_dir(MASKED, constant_logits(5, [0.0, 1.0, 2.0, 3.0]), 5))
    rows = np.array([[1, 0, 0, 0, 0.5], [0, 0, 0, 0, 0.5]], dtype=np.float32)
    for kind in Kind:
        (result,) = policy.run([Task(rows, kind, seed=1)])
        assert isinstance(result, InputError)
        assert result.kind == "no_allowed_action"
        assert result.loc == ("body", "observations", 1)
        assert "move" in result.msg
    (alone,) = policy.run([Task(rows[1:], Kind.SAMPLE)])
    assert isinstance(alone, InputError) and alone.loc == ("body",)


def test_all_masked_head_answers_422(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(MASKED, constant_logits(5, [0.0, 1.0, 2.0, 3.0]), 5))
    blocked = {"actionMask": [False, False, False, False], "x": 0.0}
    for path in ("/predict", "/predict_deterministic", "/distribution", "/predict/"):
        detail = post(client, path, blocked, status=422)["detail"]
        assert detail[0]["type"] == "no_allowed_action"
    fine = {"actionMask": [True, False, False, False], "x": 0.0}
    detail = post(client, "/predict_batch", {"observations": [fine, blocked, fine]}, status=422)["detail"]
    assert detail[0]["type"] == "no_allowed_action" and detail[0]["loc"] == ["body", "observations", 1]
    assert post(client, "/predict", fine) == {"actions": [0], "probability": 1.0}


# --- sampling statistics -------------------------------------------------------------------------


def test_sampling_follows_the_distribution(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(ONE_X, constant_logits(1, LOGITS), 1))
    probabilities = np.array(post(client, "/distribution", {"x": 0})["heads"][0]["probabilities"])
    draws = 20_000
    drawn = np.array([actions[0] for actions in batch_actions(client, {"x": 0}, draws, seed=20240501)])
    counts = np.bincount(drawn, minlength=len(LOGITS))
    assert counts.sum() == draws and len(counts) == len(LOGITS)
    assert stats.chisquare(counts, f_exp=probabilities * draws).pvalue > 0.001
    # negative control: the same counts against a distribution off by 0.02 on two actions fail
    wrong = probabilities.copy()
    wrong[0] += 0.02
    wrong[2] -= 0.02
    assert stats.chisquare(counts, f_exp=wrong * draws).pvalue < 0.001
    # and a sampler that ignored the distribution (uniform) would be caught
    uniform = np.bincount(np.random.default_rng(0).integers(0, len(LOGITS), draws), minlength=len(LOGITS))
    assert stats.chisquare(uniform, f_exp=probabilities * draws).pvalue < 0.001


def test_masked_sampling_follows_the_renormalised_distribution(make_policy_dir: MakePolicyDir) -> None:
    policy = policy_of(make_policy_dir(MASKED, constant_logits(5, [0.5, 3.0, -0.2, 1.0]), 5))
    draws = 20_000
    rows = np.tile(np.array([[1, 0, 1, 1, 0.0]], dtype=np.float32), (draws, 1))
    (decisions,) = policy.run([Task(rows, Kind.SAMPLE, seed=99)])
    assert isinstance(decisions, Decisions)
    counts = np.bincount([a[0] for a in decisions.actions], minlength=4)
    assert counts[1] == 0
    expected = softmax32([0.5, -0.2, 1.0]) * draws
    assert stats.chisquare(counts[[0, 2, 3]], f_exp=expected).pvalue > 0.001


def test_sample_discrete_never_draws_a_zero_probability_action() -> None:
    probabilities = np.tile(np.array([[0.0, 0.3, 0.0, 0.7, 0.0]]), (50_000, 1))
    drawn = sample_discrete(probabilities, random.Random(5))
    assert set(np.unique(drawn).tolist()) == {1, 3}
    assert stats.chisquare(np.bincount(drawn, minlength=5)[[1, 3]], f_exp=[0.3 * 50_000, 0.7 * 50_000]).pvalue > 0.001


def test_seed_is_reproducible(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(ONE_X, constant_logits(1, [0.0, 0.1, -0.1, 0.05]), 1))
    answers = [post(client, "/predict?seed=7", {"x": 1.0}) for _ in range(5)]
    assert all(answer == answers[0] for answer in answers)
    first = batch_actions(client, {"x": 1.0}, 60, seed=1)
    assert batch_actions(client, {"x": 1.0}, 60, seed=1) == first
    assert batch_actions(client, {"x": 1.0}, 60, seed=2) != first
    # without a seed, two batches differ: the seed is what makes them equal
    unseeded = [post(client, "/predict_batch", {"observations": [{"x": 1.0}] * 60})["results"] for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    # /predict_raw takes a seed too
    raw = [post(client, "/predict_raw?seed=11", {"obs": [1.0]}) for _ in range(3)]
    assert raw[0] == raw[1] == raw[2]


# --- tuple heads ---------------------------------------------------------------------------------

TUPLE_KEY = "parameters: {discrete: true, tuple: true, api_key: '1234567asdfgh'}\nobservations:\n  x: {type: float}\n"
TUPLE_ACTIONS = TUPLE_KEY + "actions:\n  - {name: a, n: 2, labels: [left, right]}\n  - {name: b, n: 3}\n"
HEAD_A, HEAD_B = [0.5, -0.5], [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("schema", "module", "names"),
    [
        (TUPLE_ACTIONS, lambda: constant_logits(1, HEAD_A + HEAD_B), ["a", "b"]),
        (TUPLE_ACTIONS, lambda: constant_heads(1, [HEAD_A, HEAD_B]), ["a", "b"]),
        (TUPLE_KEY, lambda: constant_heads(1, [HEAD_A, HEAD_B]), ["action_0", "action_1"]),
    ],
    ids=["one-tensor-split-by-actions", "one-tensor-per-head", "one-tensor-per-head-without-actions"],
)
def test_tuple_heads(
    make_policy_dir: MakePolicyDir, serve: Serve, schema: str, module: Callable[[], torch.nn.Module], names: list[str]
) -> None:
    client = serve(make_policy_dir(schema, module(), 1))
    heads = post(client, "/distribution", {"x": 0})["heads"]
    assert [head["name"] for head in heads] == names
    expected_a, expected_b = softmax32(HEAD_A), softmax32(HEAD_B)
    np.testing.assert_allclose(heads[0]["probabilities"], expected_a, atol=1e-12)
    np.testing.assert_allclose(heads[1]["probabilities"], expected_b, atol=1e-12)
    if names[0] == "a":
        assert heads[0]["labels"] == ["left", "right"] and heads[1]["labels"] is None
    deterministic = post(client, "/predict_deterministic", {"x": 0})
    assert deterministic["actions"] == [0, 2]
    assert deterministic["probability"] == pytest.approx(expected_a[0] * expected_b[2], rel=1e-12)
    seen = set()
    for seed in range(30):
        answer = post(client, f"/predict?seed={seed}", {"x": 0})
        a, b = answer["actions"]
        seen.add((a, b))
        assert answer["probability"] == pytest.approx(expected_a[a] * expected_b[b], rel=1e-12)
    assert len(seen) > 2


def test_tuple_heads_are_sampled_independently(make_policy_dir: MakePolicyDir) -> None:
    policy = policy_of(make_policy_dir(TUPLE_ACTIONS, constant_logits(1, HEAD_A + HEAD_B), 1))
    draws = 20_000
    (decisions,) = policy.run([Task(np.zeros((draws, 1), dtype=np.float32), Kind.SAMPLE, seed=8)])
    assert isinstance(decisions, Decisions)
    pairs = np.array(decisions.actions)
    counts = np.bincount(pairs[:, 0] * 3 + pairs[:, 1], minlength=6)
    joint = np.outer(softmax32(HEAD_A), softmax32(HEAD_B)).ravel()
    assert stats.chisquare(counts, f_exp=joint * draws).pvalue > 0.001
    np.testing.assert_allclose(decisions.probabilities, joint[pairs[:, 0] * 3 + pairs[:, 1]], rtol=1e-12)


def test_tuple_with_mask_masks_each_head(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    schema = (
        "parameters: {discrete: true, tuple: true, api_key: '1234567asdfgh'}\n"
        "observations:\n  actionMask: {type: 'List[bool]', min_items: 5, max_items: 5}\n"
        "actions:\n  - {name: a, n: 2}\n  - {name: b, n: 3}\n"
    )
    client = serve(make_policy_dir(schema, constant_logits(5, HEAD_A + HEAD_B), 5))
    heads = post(client, "/distribution", {"actionMask": [False, True, True, False, True]})["heads"]
    assert heads[0]["probabilities"] == [0.0, 1.0]
    assert heads[1]["probabilities"][1] == 0.0
    np.testing.assert_allclose(heads[1]["probabilities"], [softmax32([1.0, 3.0])[0], 0.0, softmax32([1.0, 3.0])[1]], atol=1e-12)


@pytest.mark.parametrize(
    ("schema", "module", "sizes"),
    [
        (TUPLE_ACTIONS, lambda: constant_heads(1, [HEAD_B, HEAD_A]), ["[3, 2]", "[2, 3]"]),
        (TUPLE_ACTIONS, lambda: constant_logits(1, [*HEAD_A, *HEAD_B, 0.0]), ["6", "5"]),
        (KEY + "observations:\n  x: {type: float}\nactions:\n  - {name: a, n: 3}\n", lambda: constant_logits(1, HEAD_A), ["2", "3"]),
    ],
    ids=["per-head-sizes-differ", "concatenated-total-differs", "single-head-size-differs"],
)
def test_heads_that_do_not_match_the_model_stop_start_up(
    make_policy_dir: MakePolicyDir, schema: str, module: Callable[[], torch.nn.Module], sizes: list[str]
) -> None:
    folder = make_policy_dir(schema, module(), 1)
    with pytest.raises(ConfigError) as info:
        build_app(settings_for(folder))
    assert info.value.key == "actions" and "\n" not in str(info.value)
    for size in sizes:
        assert size in info.value.problem


class LogitsAndValue(torch.nn.Module):
    """An actor-critic: (logits, value), as many exported policies are."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = FixedLogits(torch.zeros(2, len(logits)), torch.tensor(logits))
        self.value = torch.nn.Linear(2, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(obs), self.value(obs) + 100.0


@pytest.mark.parametrize("model_name", ["model.pt2", "model.pt"])
def test_tuple_false_model_returning_logits_and_value_reads_the_first(
    make_policy_dir: MakePolicyDir, serve: Serve, model_name: str
) -> None:
    schema = KEY + "observations:\n  x: {type: float}\n  y: {type: float}\n"
    client = serve(make_policy_dir(schema, LogitsAndValue([0.2, 1.5, -1.0]), 2, model_name))
    heads = post(client, "/distribution", {"x": 1, "y": 2})["heads"]
    assert len(heads) == 1
    np.testing.assert_allclose(heads[0]["probabilities"], softmax32([0.2, 1.5, -1.0]), atol=1e-12)
    assert post(client, "/predict_deterministic", {"x": 1, "y": 2})["actions"] == [1]
    info = client.get("/info", headers=AUTH).json()
    assert [head["n"] for head in info["heads"]] == [3]


# --- continuous heads ----------------------------------------------------------------------------

CONTINUOUS_KEY = "parameters: {discrete: false, tuple: true, api_key: '1234567asdfgh'}\nobservations:\n  x: {type: float}\n"
CONTINUOUS = CONTINUOUS_KEY + "actions:\n  - {name: a, size: 2}\n  - {name: b, size: 1, low: -1, high: 1}\n"
MEAN_A, STD_A, STD_B = [0.5, -2.0], [0.3, 1.5], 5.0


def gaussian_model() -> torch.nn.Module:
    """Per head: means, then log-stds. Head b's mean is 4·x (0 at x=0, clipped at x=1)."""
    weight = torch.zeros(1, 6)
    weight[0, 4] = 4.0
    bias = torch.tensor([*MEAN_A, math.log(STD_A[0]), math.log(STD_A[1]), 0.0, math.log(STD_B)])
    return FixedLogits(weight, bias)


def test_continuous_means_only_returns_the_mean(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    schema = "parameters: {discrete: false, api_key: '1234567asdfgh'}\nobservations:\n  x: {type: float}\n"
    client = serve(make_policy_dir(schema, FixedLogits(torch.tensor([[1.0, 2.0]]), torch.tensor([0.25, -1.5])), 1))
    for path in ("/predict", "/predict_deterministic", "/predict?seed=3"):
        answer = post(client, path, {"x": 1.0})
        assert answer["probability"] is None
        np.testing.assert_allclose(answer["actions"], [1.25, 0.5], atol=1e-6)
    heads = post(client, "/distribution", {"x": 2.0})["heads"]
    assert len(heads) == 1 and heads[0]["std"] is None
    np.testing.assert_allclose(heads[0]["mean"], [2.25, 2.5], atol=1e-6)
    raw = post(client, "/predict_raw", {"obs": [0.0]})
    np.testing.assert_allclose(raw["actions"], [0.25, -1.5], atol=1e-6)


def test_continuous_distribution_gives_mean_and_std(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(CONTINUOUS, gaussian_model(), 1))
    heads = post(client, "/distribution", {"x": 0.0})["heads"]
    assert [head["name"] for head in heads] == ["a", "b"]
    np.testing.assert_allclose(heads[0]["mean"], MEAN_A, atol=1e-6)
    np.testing.assert_allclose(heads[0]["std"], STD_A, rtol=1e-6)
    np.testing.assert_allclose(heads[1]["mean"], [0.0], atol=1e-6)
    np.testing.assert_allclose(heads[1]["std"], [STD_B], rtol=1e-6)
    assert "probabilities" not in heads[0] or heads[0]["probabilities"] is None


def test_continuous_samples_have_the_right_statistics_and_are_clipped(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(CONTINUOUS, gaussian_model(), 1))
    draws = 5_000
    response = post(client, "/predict_batch?seed=2024", {"observations": [{"x": 0.0}] * draws})["results"]
    assert all(result["probability"] is None for result in response)
    samples = np.array([result["actions"] for result in response])
    assert samples.shape == (draws, 3)
    for column, (mean, std) in enumerate(zip(MEAN_A, STD_A, strict=True)):
        values = samples[:, column]
        assert abs(values.mean() - mean) < 5 * std / math.sqrt(draws)
        assert values.std(ddof=1) == pytest.approx(std, rel=0.05)
        assert stats.kstest(values, "norm", args=(mean, std)).pvalue > 0.001
        assert stats.kstest(values, "norm", args=(mean, std * 1.25)).pvalue < 0.001  # negative control
    clipped = samples[:, 2]
    assert clipped.min() == -1.0 and clipped.max() == 1.0
    above = float(np.mean(clipped == 1.0))
    expected_above = float(stats.norm.sf(1.0, loc=0.0, scale=STD_B))  # P(N(0, 5) > 1) ≈ 0.42
    assert abs(above - expected_above) < 5 * math.sqrt(expected_above * (1 - expected_above) / draws)
    inside = clipped[(clipped > -1.0) & (clipped < 1.0)]
    assert len(inside) > 500 and len(np.unique(inside)) == len(inside)  # sampled, not a few constants


def test_continuous_deterministic_is_the_mean_clipped(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    client = serve(make_policy_dir(CONTINUOUS, gaussian_model(), 1))
    centred = post(client, "/predict_deterministic", {"x": 0.0})
    np.testing.assert_allclose(centred["actions"], [*MEAN_A, 0.0], atol=1e-6)
    assert centred["probability"] is None
    assert post(client, "/predict_deterministic", {"x": 1.0})["actions"][2] == 1.0  # mean 4 → high
    assert post(client, "/predict_deterministic", {"x": -0.1})["actions"][2] == pytest.approx(-0.4, abs=1e-6)
    assert post(client, "/predict_deterministic", {"x": -2.0})["actions"][2] == -1.0  # mean -8 → low
    # sampling far above the bounds (mean 40, std 5) stays inside them
    for action in batch_actions(client, {"x": 10.0}, 200, seed=5):
        assert action[2] == 1.0


def test_continuous_per_head_tensors(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    # head a: one tensor of means and log-stds; head b: a tensor of means only
    module = constant_heads(1, [[*MEAN_A, math.log(STD_A[0]), math.log(STD_A[1])], [3.0]])
    client = serve(make_policy_dir(CONTINUOUS, module, 1))
    heads = post(client, "/distribution", {"x": 0.0})["heads"]
    np.testing.assert_allclose(heads[0]["std"], STD_A, rtol=1e-6)
    assert heads[1]["std"] is None
    np.testing.assert_allclose(heads[1]["mean"], [3.0], atol=1e-6)
    samples = np.array(batch_actions(client, {"x": 0.0}, 400, seed=1))
    assert np.all(samples[:, 2] == 1.0)  # mean 3 without std → 3, clipped to high
    assert samples[:, 0].std() > 0.1


def test_continuous_single_head_with_scalar_bounds(make_policy_dir: MakePolicyDir, serve: Serve) -> None:
    schema = (
        "parameters: {discrete: false, api_key: '1234567asdfgh'}\nobservations:\n  x: {type: float}\n"
        "actions:\n  - {name: throttle, size: 2, low: 0.0, high: [1.0, 10.0]}\n"
    )
    client = serve(make_policy_dir(schema, FixedLogits(torch.zeros(1, 4), torch.tensor([0.5, 0.5, 1.0, 1.0])), 1))
    samples = np.array(batch_actions(client, {"x": 0.0}, 2000, seed=3))
    assert samples[:, 0].min() == 0.0 and samples[:, 0].max() == 1.0
    assert samples[:, 1].min() == 0.0 and samples[:, 1].max() > 1.0 and samples[:, 1].max() <= 10.0


# --- start-up checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["model.pt2", "model.pt"])
def test_width_mismatch_stops_start_up_naming_both_sizes(make_policy_dir: MakePolicyDir, model_name: str) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA, mlp(24, 4), 24, model_name)
    with pytest.raises(ConfigError) as info:
        build_app(settings_for(folder))
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"\b24\b", info.value.problem) and re.search(r"\b6\b", info.value.problem), message
    assert str(folder / "models" / model_name) in message
    assert "fix: " in message


class TimesWeight(torch.nn.Module):
    """obs @ w with w [in, out]: its first parameter is not the [out, in] of a Linear."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.w = torch.nn.Parameter(torch.randn(inputs, outputs))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.w


class TimesConstant(torch.nn.Module):
    """obs @ w with w a plain tensor attribute: TorchScript keeps it, neither parameter nor buffer."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.w = torch.ones(inputs, outputs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.w


class ScaledFirst(torch.nn.Module):
    """obs * scale [6], then Linear(6, 3) and Linear(3, 1): runs on rows of 6 values, and of 1 (broadcast)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((6,), 0.5))
        self.body = torch.nn.Linear(6, 3)
        self.out = torch.nn.Linear(3, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.out(self.body(obs * self.scale)), torch.zeros(obs.shape[0], 1)], dim=1)


class AlwaysFails(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.shape[0] > 0:
            raise RuntimeError("this model refuses every row")
        return self.linear(obs)


def observations_schema(count: int) -> str:
    return KEY + "observations:\n" + "".join(f"  x{i}: {{type: float}}\n" for i in range(count))


def start_up_error(folder: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        policy_of(folder)
    assert "\n" not in str(info.value) and "fix: " in str(info.value)
    return info.value


@pytest.mark.parametrize("module", [TimesWeight(6, 4), torch.nn.Linear(6, 4)], ids=["x-times-w", "linear"])
def test_a_torchscript_model_of_the_schemas_size_starts(make_policy_dir: MakePolicyDir, module: torch.nn.Module) -> None:
    policy = policy_of(make_policy_dir(observations_schema(6), module, 6, "model.pt"))
    assert policy.input_size == 6
    decided = policy.run([Task(np.ones((2, 6), dtype=np.float32), Kind.DETERMINISTIC)])[0]
    assert isinstance(decided, Decisions) and len(decided.actions) == 2


@pytest.mark.parametrize("module", [TimesWeight(6, 4), TimesConstant(6, 4)], ids=["parameter", "constant"])
def test_a_torchscript_model_of_another_size_is_told_by_its_true_size(make_policy_dir: MakePolicyDir, module: torch.nn.Module) -> None:
    folder = make_policy_dir(observations_schema(5), module, 6, "model.pt")
    error = start_up_error(folder)
    assert error.path == str(folder / "models" / "model.pt") and error.key == "model"
    assert error.problem == "takes 6 input values but schema.yaml describes 5"


def test_a_model_that_runs_on_several_sizes_is_told_by_all_of_them(make_policy_dir: MakePolicyDir) -> None:
    error = start_up_error(make_policy_dir(observations_schema(5), ScaledFirst(), 6, "model.pt"))
    assert error.problem == "takes 1 or 6 input values but schema.yaml describes 5"
    variable = KEY + "observations:\n  x: {type: 'List[float]'}\n"
    error = start_up_error(make_policy_dir(variable, ScaledFirst(), 6, "model.pt"))
    assert error.key == "observations" and "it runs on rows of 1 or 6 values" in error.problem


def test_a_model_that_fails_on_the_schemas_size_quotes_torch(make_policy_dir: MakePolicyDir) -> None:
    error = start_up_error(make_policy_dir(observations_schema(6), AlwaysFails(), 6, "model.pt"))
    assert error.problem.startswith("fails on a row of 6 input values, the size schema.yaml describes (")
    assert "this model refuses every row" in error.problem
    assert "TorchScript interpreter" not in error.problem  # its preamble, not the error


def test_a_torchscript_models_size_is_found_when_the_schema_does_not_fix_it(make_policy_dir: MakePolicyDir) -> None:
    variable = KEY + "observations:\n  x: {type: 'List[float]'}\n"
    policy = policy_of(make_policy_dir(variable, TimesWeight(5, 3), 5, "model.pt"))
    assert policy.input_size == 5


def nan_weights(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))
    return module


class NaNOffZero(torch.nn.Module):
    """sqrt(-obs): finite on a zero row, NaN once an observation is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.sqrt(-obs))


@pytest.mark.parametrize("model_name", ["model.pt2", "model.pt"])
def test_a_model_of_nan_outputs_stops_start_up(make_policy_dir: MakePolicyDir, model_name: str) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA, nan_weights(mlp(6, 4)), 6, model_name)
    error = start_up_error(folder)
    assert error.path == str(folder / "models" / model_name) and error.key == "model"
    assert error.problem == "gives NaN or infinite outputs for an all-zero input row"


def test_a_model_of_nan_outputs_for_the_example_observation_stops_start_up(make_policy_dir: MakePolicyDir) -> None:
    error = start_up_error(make_policy_dir(MOUSE_SCHEMA, NaNOffZero(), 6))  # the example: mouse_row 2 (bounds 0..4)
    assert error.problem == "gives NaN or infinite outputs for the schema's example observation"


def test_nan_logits_of_masked_actions_are_found_on_the_example(make_policy_dir: MakePolicyDir) -> None:
    """A zero row masks every action (so hides NaN logits); the example observation allows them all."""
    error = start_up_error(make_policy_dir(MASKED, nan_weights(mlp(5, 4)), 5))
    assert error.problem == "gives NaN or infinite outputs for the schema's example observation"


def test_mask_length_differs_from_the_models_actions(make_policy_dir: MakePolicyDir) -> None:
    schema = KEY + "observations:\n  actionMask: {type: 'List[bool]', min_items: 4, max_items: 4}\n"
    folder = make_policy_dir(schema, constant_logits(4, [0.0, 1.0, 2.0]), 4)
    with pytest.raises(ConfigError) as info:
        build_app(settings_for(folder))
    assert info.value.key == "observations.actionMask"
    assert "4" in info.value.problem and "3" in info.value.problem


# --- batching ------------------------------------------------------------------------------------


def test_a_batch_of_tasks_answers_each_as_if_alone(make_policy_dir: MakePolicyDir) -> None:
    policy = policy_of(make_policy_dir(MASKED, mlp(5, 4, seed=7), 5))
    rng = np.random.default_rng(3)

    def rows(count: int) -> np.ndarray:
        block = rng.uniform(-2, 2, size=(count, 5)).astype(np.float32)
        block[:, :4] = rng.random((count, 4)) > 0.3
        block[:, 0] = 1.0  # at least one allowed action
        return block

    tasks = [
        Task(rows(3), Kind.DISTRIBUTION),
        Task(rows(4), Kind.SAMPLE, seed=5),
        Task(rows(1), Kind.DETERMINISTIC),
        Task(np.zeros((1, 3), dtype=np.float32), Kind.SAMPLE),  # wrong width: its own error
        Task(rows(2), Kind.SAMPLE, seed=9),
        Task(np.array([[0, 0, 0, 0, 1.0]], dtype=np.float32), Kind.SAMPLE),  # nothing allowed
        Task(rows(6), Kind.DETERMINISTIC),
    ]
    alone = [policy.run([task])[0] for task in tasks]

    calls: list[int] = []
    model = policy.model

    def counting(batch: np.ndarray) -> list[np.ndarray]:
        calls.append(len(batch))
        return model(batch)

    policy.model = counting
    together = policy.run(tasks)
    assert calls == [17]  # one forward pass for every valid task's rows (3+4+1+2+1+6)
    assert len(together) == len(tasks)
    for single, batched in zip(alone, together, strict=True):
        assert type(single) is type(batched)
        if isinstance(single, InputError):
            assert isinstance(batched, InputError)
            assert (single.kind, single.loc) == (batched.kind, batched.loc)
        elif isinstance(single, Decisions):
            assert isinstance(batched, Decisions)
            assert batched.actions == single.actions
            np.testing.assert_allclose(batched.probabilities, single.probabilities, rtol=1e-6)
        else:
            assert isinstance(batched, Distributions) and isinstance(single, Distributions) and len(batched.rows) == len(single.rows)
            for row_alone, row_batched in zip(single.rows, batched.rows, strict=True):
                np.testing.assert_allclose(row_batched[0]["probabilities"], row_alone[0]["probabilities"], atol=1e-6)
    assert isinstance(together[3], InputError) and together[3].kind == "input_size"
    assert isinstance(together[5], InputError) and together[5].kind == "no_allowed_action"
    decided = together[6]
    assert isinstance(decided, Decisions) and len(decided.actions) == 6


# --- a failing model -----------------------------------------------------------------------------


class FailsOnLargeInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 3)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if bool((obs > 100.0).any()):
            raise RuntimeError("the model exploded on purpose")
        return self.linear(obs)


def test_a_failing_model_answers_500_with_an_error_id_in_the_log(
    make_policy_dir: MakePolicyDir, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    client = serve(make_policy_dir(ONE_X, FailsOnLargeInput(), 1, "model.pt"))
    caplog.set_level(logging.ERROR, logger="policy_server")
    response = client.post("/predict", json={"x": 1000.0}, headers=AUTH)
    assert response.status_code == 500
    detail = response.json()["detail"]
    match = re.search(r"error id ([0-9a-f]{6,})", detail)
    assert match, detail
    assert "exploded" not in response.text
    error_id = match.group(1)
    logged = [record for record in caplog.records if error_id in record.getMessage()]
    assert logged, [record.getMessage() for record in caplog.records]
    assert logged[0].levelno >= logging.ERROR and logged[0].exc_info is not None
    assert "exploded" in caplog.text  # the traceback is in the log
    assert post(client, "/predict", {"x": 1.0})["actions"][0] in (0, 1, 2)  # and the server still answers


@pytest.mark.parametrize("draws", [0, 1, 15, 16, 17, 1024])
@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_uniforms_are_the_generators_own_draws(seed: int, draws: int) -> None:
    """A batch's draws are `rng.random()`'s, however many rows: a seeded batch samples the same
    actions as the rows drawn one by one would, and the generator is left where they leave it."""
    ours, reference = random.Random(seed), random.Random(seed)
    expected = [reference.random() for _ in range(draws)]
    assert uniforms(ours, draws).tolist() == expected
    assert ours.random() == reference.random()
