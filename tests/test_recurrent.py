"""Recurrent policies (issue 16): the server keeps each episode's state.

RecurrentPPO agents trained here, imported with `import_sb3`, served by a real uvicorn: every
step's action is `RecurrentPPO.predict(obs, state, episode_start, deterministic=True)`'s over
interleaved episodes, concurrent episodes each get their own state, and the store's bounds,
expiry, version pinning and refusals answer as documented.
"""

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from recurrent_support import (
    ENVIRONMENTS,
    Expected,
    Sb3Episode,
    api_key_header,
    import_recurrent,
    observations_of,
    play_interleaved,
    query,
    train_recurrent,
)
from sb3_contrib import RecurrentPPO
from servers import free_port, running_server, serve_command
from test_metrics import sample_value

from policy_server.experience.episodes import AgentRef
from policy_server.recurrent.states import StateRows

Serve = Callable[..., TestClient]
ADMIN_KEY = "operator-secret-rnn"
EPISODES = [AgentRef("e0"), AgentRef("e1"), AgentRef("e2"), AgentRef("duo", "a"), AgentRef("duo", "b")]
STEPS = 8
CONCURRENT_EPISODES = 48
CONCURRENT_STEPS = 6
BATCHED_ROUNDING = 1e-7  # an action of ~0.03 computed in a batch of rows: within a few float32 steps of one row's


@pytest.fixture(scope="module")
def agents() -> dict[str, RecurrentPPO]:
    return {kind: train_recurrent(environment) for kind, environment in ENVIRONMENTS.items()}


@pytest.fixture(scope="module")
def folders(agents: dict[str, RecurrentPPO], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recurrent")
    return {kind: import_recurrent(agent, root / kind) for kind, agent in agents.items()}


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_interleaved_episodes_answer_as_recurrent_ppo_predict(
    kind: str, agents: dict[str, RecurrentPPO], folders: dict[str, Path], tmp_path: Path
) -> None:
    """Five episodes (one of two agents) interleaved over real HTTP, one begun again midway:
    exact actions, and distributions within 1e-5 of the policy's own, step after step."""
    folder, port = folders[kind], free_port()
    with (
        running_server(serve_command(folder, port), port, cwd=tmp_path) as server,
        httpx.Client(base_url=server.url, headers=api_key_header(folder), timeout=30) as client,
    ):
        answered = play_interleaved(client.post, agents[kind], EPISODES, STEPS, restart={AgentRef("e1"): 5})
        info = client.get("/info").json()["recurrent"]
    assert len(answered) == len(EPISODES) * STEPS
    assert info["episodes"] == len(EPISODES) and info["state_size"] == 2 * 16
    assert info["state_bytes"] == StateRows.FIRST_ROWS * 2 * 16 * 4  # the rows allocated: the first 64


def _expected_steps(agent: RecurrentPPO, episode: int, steps: int) -> tuple[list[np.ndarray], list[Expected], list[Expected]]:
    """An episode's observations, sb3's answers to them in order, and its answers had every step begun anew."""
    observations = list(observations_of(agent, steps, seed=1000 + episode))
    playing = Sb3Episode(agent)
    return observations, [playing.step(o) for o in observations], [Sb3Episode(agent).step(o) for o in observations]


def test_concurrent_episodes_each_get_their_own_state(agents: dict[str, RecurrentPPO], folders: dict[str, Path], tmp_path: Path) -> None:
    """48 episodes in flight at once (their steps share forward passes), each step answered from its own
    episode's state: a state given to the wrong episode, or not kept, changes the answer."""
    agent, folder, port = agents["continuous"], folders["continuous"], free_port()
    plans = [_expected_steps(agent, episode, CONCURRENT_STEPS) for episode in range(CONCURRENT_EPISODES)]
    # The test can fail: memory changes every later step's action by far more than the float32
    # rounding a forward pass of many rows may differ by from sb3's one-row passes.
    for _, stateful, fresh in plans:
        assert all(abs(s.action[0] - f.action[0]) > 10 * BATCHED_ROUNDING for s, f in zip(stateful[1:], fresh[1:], strict=True))

    async def play(client: httpx.AsyncClient, episode: int) -> list[dict[str, object]]:
        observations, _, _ = plans[episode]
        answers = []
        for observation in observations:
            answer = await client.post("/predict_deterministic", json={"obs": observation.tolist()}, params={"episode_id": f"c{episode}"})
            assert answer.status_code == 200, answer.text
            answers.append(answer.json())
        return answers

    async def play_all(url: str) -> list[list[dict[str, object]]]:
        limits = httpx.Limits(max_connections=CONCURRENT_EPISODES)
        async with httpx.AsyncClient(base_url=url, headers=api_key_header(folder), timeout=60, limits=limits) as client:
            return await asyncio.gather(*(play(client, episode) for episode in range(CONCURRENT_EPISODES)))

    with running_server(serve_command(folder, port), port, cwd=tmp_path) as server:
        served = asyncio.run(play_all(server.url))
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    for answers, (_, stateful, _) in zip(served, plans, strict=True):
        served_actions = np.array([answer["actions"] for answer in answers])
        np.testing.assert_allclose(served_actions, np.array([expected.action for expected in stateful]), rtol=0, atol=BATCHED_ROUNDING)
    assert sample_value(metrics, "policy_server_recurrent_episodes", {"policy": folder.name}) == CONCURRENT_EPISODES
    assert sample_value(metrics, "policy_server_batch_size_rows_count") < CONCURRENT_EPISODES * CONCURRENT_STEPS  # passes were shared


def _step(client: TestClient, ref: AgentRef, observation: list[float], start: bool = False) -> httpx.Response:
    return client.post("/predict_deterministic", json={"obs": observation}, params=query(ref, start))


def test_the_least_recently_used_episode_is_evicted_and_its_next_step_is_409(
    agents: dict[str, RecurrentPPO], tmp_path: Path, serve: Serve
) -> None:
    folder = import_recurrent(agents["discrete"], tmp_path / "small", max_episodes=3)
    client = serve(folder)
    client.headers.update(api_key_header(folder))
    observation = [0.1, 0.2, 0.3, 0.4]
    for name in ("a", "b", "c"):
        assert _step(client, AgentRef(name), observation).status_code == 200
    assert _step(client, AgentRef("a"), observation).status_code == 200  # a is now the most recently used
    assert _step(client, AgentRef("d"), observation).status_code == 200  # b goes
    gone = _step(client, AgentRef("b"), observation)
    assert gone.status_code == 409
    assert "episode 'b'" in gone.json()["detail"] and "evicted" in gone.json()["detail"] and "episode_start=true" in gone.json()["detail"]
    info = client.get("/info").json()["recurrent"]
    assert (info["episodes"], info["evicted"], info["max_episodes"]) == (3, 1, 3)
    assert _step(client, AgentRef("b"), observation, start=True).status_code == 200  # begun again (c goes)
    assert _step(client, AgentRef("a"), observation).status_code == 200
    assert _step(client, AgentRef("c"), observation).status_code == 409


def test_an_idle_episode_expires_and_its_next_step_is_409(agents: dict[str, RecurrentPPO], tmp_path: Path, serve: Serve) -> None:
    folder = import_recurrent(agents["discrete"], tmp_path / "expiring", idle_expiry_seconds=0.5)
    client = serve(folder)
    client.headers.update(api_key_header(folder))
    observation = [0.1, 0.2, 0.3, 0.4]
    assert _step(client, AgentRef("idle"), observation).status_code == 200
    time.sleep(0.8)
    assert _step(client, AgentRef("fresh"), observation).status_code == 200
    expired = _step(client, AgentRef("idle"), observation)
    assert expired.status_code == 409 and "expired" in expired.json()["detail"] and "idle more than 0.5 s" in expired.json()["detail"]
    info = client.get("/info").json()["recurrent"]
    assert (info["episodes"], info["expired"], info["evicted"]) == (1, 1, 0)
    assert _step(client, AgentRef("idle"), observation, start=True).status_code == 200


def test_a_recurrent_policy_asks_for_an_episode(agents: dict[str, RecurrentPPO], folders: dict[str, Path], serve: Serve) -> None:
    folder = folders["discrete"]
    client = serve(folder)
    client.headers.update(api_key_header(folder))
    observation = {"obs": [0.1, 0.2, 0.3, 0.4]}
    for path in ("/predict", "/predict_deterministic", "/distribution"):
        refused = client.post(path, json=observation)
        assert refused.status_code == 422 and "is recurrent" in refused.json()["detail"] and "episode_id" in refused.json()["detail"]
    assert client.post("/predict_raw", json={"obs": [0.1, 0.2, 0.3, 0.4]}).status_code == 422
    batch = {"observations": [observation, observation]}
    assert client.post("/predict_batch", json=batch).status_code == 422
    twice = client.post("/predict_batch", json=batch, params={"episode_id": "same"})
    assert twice.status_code == 422 and "twice" in twice.json()["detail"]
    named = {"observations": [observation | {"episode_id": "x"}, observation | {"episode_id": "y"}]}
    assert client.post("/predict_batch", json=named, params={"deterministic": "true"}).status_code == 200
    assert client.get("/info").json()["recurrent"]["episodes"] == 2


def test_an_episode_stays_on_its_version(agents: dict[str, RecurrentPPO], tmp_path: Path, serve: Serve) -> None:
    """An episode begun on version 2 answers 409 once version 1 is active; begun again, it runs on 1."""
    folder = import_recurrent(agents["discrete"], tmp_path / "versions")
    for version in ("1", "2"):
        shutil.copytree(folder / "models", tmp_path / "staged" / version)
    shutil.rmtree(folder / "models")
    shutil.copytree(tmp_path / "staged", folder / "models")
    client = serve(folder, admin_key=ADMIN_KEY, watch_every_s=None)
    client.headers.update(api_key_header(folder))
    observation = [0.1, 0.2, 0.3, 0.4]
    first = _step(client, AgentRef("pinned"), observation)
    assert first.status_code == 200 and first.headers["X-Policy-Version"] == "2"
    switched = client.put(f"/policies/{folder.name}/active", json={"version": "1"}, headers={"access-token": ADMIN_KEY})
    assert switched.status_code == 200, switched.text
    refused = _step(client, AgentRef("pinned"), observation)
    assert refused.status_code == 409
    assert "began on version 2" in refused.json()["detail"] and "version 1 is" in refused.json()["detail"]
    again = _step(client, AgentRef("pinned"), observation, start=True)
    assert again.status_code == 200 and again.headers["X-Policy-Version"] == "1"
    other = _step(client, AgentRef("new"), observation)
    assert other.status_code == 200 and other.headers["X-Policy-Version"] == "1"


def test_an_oip_sequence_is_the_episode(agents: dict[str, RecurrentPPO], folders: dict[str, Path], serve: Serve) -> None:
    """OIP infer: `sequence_id` names the episode and `sequence_start` begins it, as predict's state does."""
    agent, folder = agents["discrete"], folders["discrete"]
    client = serve(folder)
    client.headers.update(api_key_header(folder))
    path = f"/v2/models/{folder.name}/infer"
    episode = Sb3Episode(agent)
    for index, observation in enumerate(observations_of(agent, 5, seed=11)):
        parameters = {"sequence_id": "oip-1", "sequence_start": index == 0, "deterministic": True}
        body = {"inputs": [{"name": "obs", "shape": [1, 4], "datatype": "FP32", "data": observation.tolist()}], "parameters": parameters}
        answer = client.post(path, json=body)
        assert answer.status_code == 200, answer.text
        outputs = {output["name"]: output["data"] for output in answer.json()["outputs"]}
        expected = episode.step(observation)
        assert outputs["actions"] == expected.action
        assert expected.probabilities is not None and abs(outputs["probability"][0] - expected.probabilities[expected.action[0]]) < 1e-5
    unnamed = client.post(path, json={"inputs": body["inputs"]})
    assert unnamed.status_code == 400 and "is recurrent" in unnamed.json()["error"]
