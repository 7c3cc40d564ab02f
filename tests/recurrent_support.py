"""Helpers for the recurrent-policy tests: tiny RecurrentPPO agents trained here, imported with
`import_sb3`, and the answers sb3-contrib's own `predict` gives, episode by episode."""

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sb3_contrib import RecurrentPPO

from policy_server.cli import Commands
from policy_server.experience.episodes import AgentRef
from policy_server.loading import SCHEMA_FILE, load_policy_spec

ENVIRONMENTS = {"discrete": "CartPole-v1", "continuous": "Pendulum-v1"}
HIDDEN = 16
TOLERANCE = 1e-5  # probabilities, means and stds against the policy's own distribution


def train_recurrent(environment: str) -> RecurrentPPO:
    """A RecurrentPPO (MlpLstmPolicy) after two short updates, on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        agent = RecurrentPPO(
            "MlpLstmPolicy", environment, seed=0, device="cpu", n_steps=64, batch_size=64, policy_kwargs={"lstm_hidden_size": HIDDEN}
        )
        return agent.learn(128)
    finally:
        torch.set_num_threads(threads)


def import_recurrent(agent: RecurrentPPO, folder: Path, **recurrent: Any) -> Path:
    """`generate.py import_sb3` of the agent into `folder`; `recurrent` overrides keys of the schema's recurrent section."""
    saved = folder.parent / f"{folder.name}-agent.zip"
    agent.save(saved)
    Commands().import_sb3(str(saved), str(folder))
    if recurrent:
        schema = folder / SCHEMA_FILE
        document = yaml.safe_load(schema.read_text())
        document["recurrent"] |= recurrent
        schema.write_text(yaml.safe_dump(document, sort_keys=False))
    return folder


def api_key_header(folder: Path) -> dict[str, str]:
    return {"access-token": str(load_policy_spec(folder).api_key)}


@dataclass
class Expected:
    """What sb3-contrib answers for one step: the deterministic action, and the distribution
    (probabilities of a discrete head, else mean and std) from the state before the step."""

    action: list[Any]
    probabilities: np.ndarray | None
    mean: np.ndarray | None
    std: np.ndarray | None


@dataclass
class Sb3Episode:
    """One episode as `RecurrentPPO.predict` plays it: its LSTM state carried from step to step."""

    agent: RecurrentPPO
    state: tuple[np.ndarray, np.ndarray] | None = None
    _started: bool = field(default=True)

    def step(self, observation: np.ndarray, start: bool = False) -> Expected:
        begins = start or self._started
        distribution = self._distribution(observation, begins)
        action, self.state = self.agent.predict(observation[None], self.state, np.array([begins]), deterministic=True)
        self._started = False
        return Expected(np.asarray(action).reshape(-1).tolist(), *distribution)

    def _distribution(self, observation: np.ndarray, begins: bool) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        policy = self.agent.policy
        zeros = np.zeros(policy.lstm_hidden_state_shape, np.float32)
        h, c = self.state if self.state is not None else (zeros, zeros)
        with torch.no_grad():
            obs = policy.obs_to_tensor(observation[None])[0]
            states = (torch.as_tensor(h, dtype=torch.float32), torch.as_tensor(c, dtype=torch.float32))
            distribution, _ = policy.get_distribution(obs, states, torch.tensor([float(begins)]))
        inner = distribution.distribution
        if hasattr(inner, "probs"):
            return inner.probs.numpy()[0], None, None
        return None, inner.mean.numpy()[0], inner.stddev.numpy()[0]


def interleaved(refs: list[AgentRef], steps: int, seed: int = 0) -> list[AgentRef]:
    """Each ref `steps` times, shuffled: the episodes' steps interleave, each episode's in order."""
    schedule = [ref for ref in refs for _ in range(steps)]
    random.Random(seed).shuffle(schedule)
    return schedule


def observations_of(agent: RecurrentPPO, count: int, seed: int) -> Iterator[np.ndarray]:
    space = agent.observation_space
    space.seed(seed)
    for _ in range(count):
        yield np.asarray(space.sample(), dtype=np.float32)


def query(ref: AgentRef, start: bool = False) -> dict[str, str]:
    params = {"episode_id": ref.episode_id}
    if ref.agent_id:
        params["agent_id"] = ref.agent_id
    if start:
        params["episode_start"] = "true"
    return params


def check_step(answer: dict[str, Any], expected: Expected) -> None:
    """The served decision is sb3's: the same action; a discrete one's probability its own."""
    assert answer["actions"] == expected.action, (answer, expected)
    if expected.probabilities is not None:
        assert abs(answer["probability"] - expected.probabilities[expected.action[0]]) < TOLERANCE, (answer, expected)


def check_distribution(heads: list[dict[str, Any]], expected: Expected) -> None:
    (head,) = heads
    if expected.probabilities is not None:
        np.testing.assert_allclose(head["probabilities"], expected.probabilities, rtol=0, atol=TOLERANCE)
    else:
        np.testing.assert_allclose(head["mean"], expected.mean, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(head["std"], expected.std, rtol=0, atol=TOLERANCE)


Post = Callable[..., Any]  # (path, json=..., params=...) → a response with .status_code and .json()


def play_interleaved(
    post: Post, agent: RecurrentPPO, refs: list[AgentRef], steps: int, restart: dict[AgentRef, int]
) -> list[tuple[Any, Any]]:
    """Play the episodes' steps interleaved through `post`, each checked against sb3: its
    distribution first (`/distribution` with the episode: from its state, not advancing it), then
    its deterministic step; `restart[ref]` is the step at which that episode begins again
    (episode_start=true). Returns each step's answers: (distribution or None, decision)."""
    episodes = {ref: Sb3Episode(agent) for ref in refs}
    taken = dict.fromkeys(refs, 0)
    answers: list[tuple[Any, Any]] = []
    observations = observations_of(agent, len(refs) * steps, seed=7)
    for ref in interleaved(refs, steps):
        observation, start = next(observations), restart.get(ref) == taken[ref]
        expected = episodes[ref].step(observation, start)
        body = {"obs": observation.tolist()}
        heads = None
        if not start:
            peeked = post("/distribution", json=body, params=query(ref))
            assert peeked.status_code == 200, peeked.text
            heads = peeked.json()["heads"]
            check_distribution(heads, expected)
        answer = post("/predict_deterministic", json=body, params=query(ref, start))
        assert answer.status_code == 200, answer.text
        check_step(answer.json(), expected)
        answers.append((heads, answer.json()))
        taken[ref] += 1
    return answers
