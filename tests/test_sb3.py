"""Stable-Baselines3 import (issue 7): tiny agents trained here, imported, served; the server decides as SB3 does."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from gymnasium import spaces
from servers import free_port, generate, running_server, serve_command
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from policy_server.cli import Commands
from policy_server.loading import load_policy_spec

Serve = Callable[..., TestClient]
STEPS = 256
OBSERVATIONS = 1000
DISTRIBUTIONS = 50
ON_POLICY = {"n_steps": 64, "batch_size": 64}  # PPO: 4 short updates
OFF_POLICY = {"learning_starts": 64, "buffer_size": 1000, "batch_size": 64}


class ToyMultiDiscrete(gym.Env[np.ndarray, np.ndarray]):
    """Three numbers in [-1, 1]; three heads of 3, 2 and 4 actions; rewarded for matching signs."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.MultiDiscrete([3, 2, 4])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.steps = 0
        return self._observe(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        reward = float(action[1] == int(self.observation[0] > 0)) + float(action[0] == 1)
        self.steps += 1
        return self._observe(), reward, False, self.steps >= 16, {}

    def _observe(self) -> np.ndarray:
        self.observation = self.np_random.uniform(-1.0, 1.0, 3).astype(np.float32)
        return self.observation


class ToyImages(gym.Env[np.ndarray, int]):
    """36×36 grey images, channels last (SB3 transposes them), 3 actions: what a CnnPolicy reads."""

    observation_space = spaces.Box(0, 255, (36, 36, 1), np.uint8)
    action_space = spaces.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        return self.observation_space.sample(), float(action == 1), False, bool(self.np_random.random() < 0.1), {}


def train(algorithm: type[BaseAlgorithm], env: Any, policy: str = "MlpPolicy", **kwargs: Any) -> BaseAlgorithm:
    """A few hundred steps on one torch thread (two threads on two busy cores run ~5× slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return algorithm(policy, env, seed=0, device="cpu", **kwargs).learn(STEPS)
    finally:
        torch.set_num_threads(threads)


def import_agent(model: BaseAlgorithm, tmp_path: Path, names: str | None = None, vecnormalize: Path | None = None) -> Path:
    """`python generate.py import_sb3 agent.zip policy [...]`, in this process."""
    agent, folder = tmp_path / "agent.zip", tmp_path / "policy"
    model.save(agent)
    Commands().import_sb3(str(agent), str(folder), names=names, vecnormalize=None if vecnormalize is None else str(vecnormalize))
    return folder


def start(serve: Serve, folder: Path, **settings: object) -> tuple[TestClient, dict[str, str]]:
    """The app serving `folder`, and the header with the api key import_sb3 wrote."""
    return serve(folder, **settings), {"access-token": str(load_policy_spec(folder).api_key)}


def random_observations(space: spaces.Space[Any], count: int = OBSERVATIONS) -> np.ndarray:
    space.seed(1)
    return np.stack([space.sample() for _ in range(count)])


def as_request(observation: np.ndarray) -> dict[str, Any]:
    return {"obs": observation.reshape(-1).tolist()}


def served_deterministic(client: TestClient, headers: dict[str, str], observations: np.ndarray) -> np.ndarray:
    """Deterministic actions of every observation, in one /predict_batch call."""
    body = {"observations": [as_request(observation) for observation in observations]}
    answer = client.post("/predict_batch", params={"deterministic": "true"}, json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    return np.array([result["actions"] for result in answer.json()["results"]])


def served_distributions(client: TestClient, headers: dict[str, str], observations: np.ndarray) -> list[list[dict[str, Any]]]:
    answers = [client.post("/distribution", json=as_request(observation), headers=headers) for observation in observations]
    assert all(answer.status_code == 200 for answer in answers), answers[0].text
    return [answer.json()["heads"] for answer in answers]


def sb3_deterministic(model: BaseAlgorithm, observations: np.ndarray) -> np.ndarray:
    actions, _ = model.predict(observations, deterministic=True)
    return np.asarray(actions).reshape(len(observations), -1)


def sb3_probabilities(model: BaseAlgorithm, observations: np.ndarray) -> list[np.ndarray]:
    """Per head, [B, n]: SB3's own Categorical distributions."""
    with torch.no_grad():
        distribution = model.policy.get_distribution(model.policy.obs_to_tensor(observations)[0]).distribution
    heads = distribution if isinstance(distribution, list) else [distribution]
    return [head.probs.numpy() for head in heads]


def assert_same_probabilities(served: list[list[dict[str, Any]]], expected: Sequence[np.ndarray]) -> None:
    for index, head in enumerate(expected):
        probabilities = np.array([heads[index]["probabilities"] for heads in served])
        np.testing.assert_allclose(probabilities, head, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("algorithm", "settings"), [(PPO, ON_POLICY), (A2C, {}), (DQN, OFF_POLICY)], ids=["PPO", "A2C", "DQN"])
def test_cartpole_parity(algorithm: type[BaseAlgorithm], settings: dict[str, Any], tmp_path: Path, serve: Serve) -> None:
    model = train(algorithm, "CartPole-v1", **settings)
    folder = import_agent(model, tmp_path)
    client, headers = start(serve, folder)
    observations = random_observations(model.observation_space)

    assert np.array_equal(served_deterministic(client, headers, observations), sb3_deterministic(model, observations))
    sample = observations[:DISTRIBUTIONS]
    served = served_distributions(client, headers, sample)
    if algorithm is DQN:  # no distribution in SB3: the server's is softmax(Q), as the README says
        with torch.no_grad():
            q_values = model.policy.q_net(model.policy.obs_to_tensor(sample)[0]).numpy().astype(np.float64)
        expected = np.exp(q_values - q_values.max(axis=1, keepdims=True))
        assert_same_probabilities(served, [expected / expected.sum(axis=1, keepdims=True)])
    else:
        assert_same_probabilities(served, sb3_probabilities(model, sample))


def test_multidiscrete_parity(tmp_path: Path, serve: Serve) -> None:
    model = train(PPO, ToyMultiDiscrete(), **ON_POLICY)
    folder = import_agent(model, tmp_path)
    spec = load_policy_spec(folder)
    assert spec.is_tuple and [(head.name, getattr(head, "n", None)) for head in spec.actions or ()] == [
        ("action_0", 3),
        ("action_1", 2),
        ("action_2", 4),
    ]
    client, headers = start(serve, folder)
    observations = random_observations(model.observation_space)

    assert np.array_equal(served_deterministic(client, headers, observations), sb3_deterministic(model, observations))
    sample = observations[:DISTRIBUTIONS]
    assert_same_probabilities(served_distributions(client, headers, sample), sb3_probabilities(model, sample))


@pytest.mark.parametrize(("algorithm", "settings"), [(PPO, ON_POLICY), (SAC, OFF_POLICY), (TD3, OFF_POLICY)], ids=["PPO", "SAC", "TD3"])
def test_pendulum_parity(algorithm: type[BaseAlgorithm], settings: dict[str, Any], tmp_path: Path, serve: Serve) -> None:
    model = train(algorithm, "Pendulum-v1", **settings)
    folder = import_agent(model, tmp_path)
    head = (load_policy_spec(folder).actions or ())[0]
    assert (getattr(head, "low", None), getattr(head, "high", None)) == ((-2.0,), (2.0,))
    client, headers = start(serve, folder)
    observations = random_observations(model.observation_space)

    served = served_deterministic(client, headers, observations)
    np.testing.assert_allclose(served, sb3_deterministic(model, observations), rtol=0, atol=1e-5)
    sample = observations[:DISTRIBUTIONS]
    heads = [heads[0] for heads in served_distributions(client, headers, sample)]
    if algorithm is PPO:  # means and SB3's state-independent log-std
        with torch.no_grad():
            gaussian = model.policy.get_distribution(model.policy.obs_to_tensor(sample)[0]).distribution
        np.testing.assert_allclose([h["mean"] for h in heads], gaussian.mean.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose([h["std"] for h in heads], gaussian.stddev.numpy(), rtol=1e-6)
    else:  # SAC, TD3: only the deterministic action is exported, so /predict answers it too
        assert all(h["std"] is None for h in heads)
        sampled, deterministic = (
            client.post(route, json=as_request(sample[0]), headers=headers) for route in ("/predict", "/predict_deterministic")
        )
        assert sampled.json() == deterministic.json()


def test_vecnormalize_is_baked_in(tmp_path: Path, serve: Serve) -> None:
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=0), clip_obs=1.0)  # a tight clip: clipping shows
    model = train(PPO, env, **ON_POLICY)
    statistics = tmp_path / "vecnormalize.pkl"
    env.save(statistics)
    folder = import_agent(model, tmp_path, vecnormalize=statistics)
    client, headers = start(serve, folder)
    raw = random_observations(model.observation_space).astype(np.float32)
    normalized = env.normalize_obs(raw)
    expected = sb3_deterministic(model, normalized)
    assert not np.array_equal(sb3_deterministic(model, raw), expected)  # normalisation matters to this policy

    assert np.array_equal(served_deterministic(client, headers, raw), expected)
    sample = slice(0, DISTRIBUTIONS)
    assert_same_probabilities(served_distributions(client, headers, raw[sample]), sb3_probabilities(model, normalized[sample]))


def test_images_are_scaled_as_sb3_does(tmp_path: Path, serve: Serve) -> None:
    model = train(PPO, ToyImages(), policy="CnnPolicy", n_steps=64, batch_size=64, n_epochs=1)
    folder = import_agent(model, tmp_path)
    field = (load_policy_spec(folder).observations or ())[0]
    assert (field.type_name, field.width, field.minimum, field.maximum) == ("List[int]", 36 * 36, 0, 255)
    client, headers = start(serve, folder, max_body_bytes=4 * 1024 * 1024)
    observations = random_observations(model.observation_space, 200)  # channels first, as SB3 saved the space

    assert np.array_equal(served_deterministic(client, headers, observations), sb3_deterministic(model, observations))
    sample = observations[:20]
    assert_same_probabilities(served_distributions(client, headers, sample), sb3_probabilities(model, sample))


def test_names_make_scalar_fields_with_their_bounds(tmp_path: Path, serve: Serve) -> None:
    model = train(A2C, "CartPole-v1")
    names = ["position", "velocity", "angle", "angular_velocity"]
    folder = import_agent(model, tmp_path, names=",".join(names))
    fields = load_policy_spec(folder).observations or ()
    assert [(f.name, f.type_name) for f in fields] == [(name, "float") for name in names]
    assert (fields[0].maximum, fields[1].maximum) == (pytest.approx(4.8), None)  # CartPole's velocities are unbounded
    client, headers = start(serve, folder)
    observations = random_observations(model.observation_space, 20)
    expected = sb3_deterministic(model, observations)
    for observation, action in zip(observations, expected, strict=True):
        answer = client.post("/predict_deterministic", json=dict(zip(names, observation.tolist(), strict=True)), headers=headers)
        assert answer.json()["actions"] == action.tolist()
    too_far = dict(zip(names, [5.0, 0.0, 0.0, 0.0], strict=True))
    assert client.post("/predict_deterministic", json=too_far, headers=headers).status_code == 422


class DictObservations(ToyMultiDiscrete):
    observation_space = spaces.Dict({"position": spaces.Box(-1.0, 1.0, (3,), np.float32)})  # type: ignore[assignment]
    action_space = spaces.Discrete(2)  # type: ignore[assignment]


class BinaryActions(ToyMultiDiscrete):
    action_space = spaces.MultiBinary(3)  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("env", "policy", "expected"),
    [
        (DictObservations(), "MultiInputPolicy", "observation_space: Dict('position': Box(-1.0, 1.0, (3,), float32)) is not supported"),
        (BinaryActions(), "MlpPolicy", "action_space: MultiBinary(3) is not supported"),
    ],
    ids=["dict-observations", "multibinary-actions"],
)
def test_unsupported_spaces_are_one_line(
    env: gym.Env[Any, Any], policy: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = tmp_path / "agent.zip"
    PPO(policy, env, seed=0, device="cpu", **ON_POLICY).save(agent)  # untrained: the spaces are what matters
    with pytest.raises(SystemExit) as exit_info:
        Commands().import_sb3(str(agent), str(tmp_path / "policy"))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and expected in error and "fix: import_sb3 supports" in error
    assert not (tmp_path / "policy").exists()


def test_one_command_then_serve(tmp_path: Path) -> None:
    """The user's path: `generate.py import_sb3`, then `generate.py serve`, over real HTTP."""
    model = train(DQN, "CartPole-v1", **OFF_POLICY)
    agent, folder = tmp_path / "agent.zip", tmp_path / "cartpole"
    model.save(agent)
    imported = generate("import_sb3", str(agent), str(folder), "--name", "cartpole")
    assert imported.returncode == 0, imported.stderr
    assert "model.pt (torchscript), input size 4" in imported.stdout
    observations = random_observations(model.observation_space, 20)
    headers = {"access-token": str(load_policy_spec(folder).api_key)}
    port = free_port()
    with running_server(serve_command(folder, port), port, cwd=tmp_path) as server:
        body = {"observations": [as_request(observation) for observation in observations]}
        answer = httpx.post(f"{server.url}/predict_batch?deterministic=true", json=body, headers=headers, timeout=30)
    assert np.array_equal(np.array([r["actions"] for r in answer.json()["results"]]), sb3_deterministic(model, observations))
