"""Recurrent policies with backend ray: the state travels with the rows, the replicas keep none,
and the answers are local's and RecurrentPPO's, step for step."""

from pathlib import Path

import pytest
from conftest import settings_for
from fastapi.testclient import TestClient
from recurrent_support import ENVIRONMENTS, api_key_header, import_recurrent, play_interleaved, train_recurrent
from test_ray import _ray_settings, _wait_ready, local_ray  # noqa: F401  (the module's one Ray)

from policy_server.experience.episodes import AgentRef
from policy_server.server import build_app

EPISODES = [AgentRef("r0"), AgentRef("r1"), AgentRef("pair", "x"), AgentRef("pair", "y")]
STEPS = 6


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_ray_answers_recurrent_episodes_as_local_and_recurrent_ppo(kind: str, local_ray: str, tmp_path: Path) -> None:  # noqa: F811
    agent = train_recurrent(ENVIRONMENTS[kind])
    folder = import_recurrent(agent, tmp_path / f"recurrent-{kind}")
    answers = {}
    for backend, settings in (("local", {}), ("ray", _ray_settings())):
        with TestClient(build_app(settings_for(folder, **settings)), raise_server_exceptions=False) as client:
            _wait_ready(client)
            client.headers.update(api_key_header(folder))
            answers[backend] = play_interleaved(client.post, agent, EPISODES, STEPS, restart={AgentRef("r1"): 3})
            info = client.get("/info").json()
            assert info["backend"] == backend and info["state_size"] == 32 and info["recurrent"]["episodes"] == len(EPISODES)
    assert answers["ray"] == answers["local"]
