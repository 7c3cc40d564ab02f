"""The episode store alone (policy_server/recurrent/states.py), on a clock the test moves."""

import numpy as np
import pytest

from policy_server.experience.episodes import AgentRef
from policy_server.recurrent.errors import RecurrentError
from policy_server.recurrent.states import EpisodeStates
from policy_server.schema import Recurrent, StateTensor

WIDTH = 3


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(max_episodes: int = 4, expiry_s: float = 10.0) -> tuple[EpisodeStates, Clock]:
    clock = Clock()
    return EpisodeStates(Recurrent((StateTensor("h", (WIDTH,)),), expiry_s, max_episodes), "p", clock), clock


def step(states: EpisodeStates, name: str, value: float, version: str = "1", start: bool = False) -> np.ndarray:
    """One step of episode `name` whose new state is all `value`; the state it began from."""
    claim = states.claim([AgentRef(name)], start, version)
    states.keep(claim, np.full((1, WIDTH), value, np.float32), version)
    return claim.state[0]


def test_each_episode_continues_from_its_own_last_state_and_a_start_from_zeros() -> None:
    states, _ = store()
    assert step(states, "a", 1.0).tolist() == [0.0] * WIDTH
    assert step(states, "b", 2.0).tolist() == [0.0] * WIDTH
    assert step(states, "a", 3.0).tolist() == [1.0] * WIDTH
    assert step(states, "b", 4.0).tolist() == [2.0] * WIDTH
    assert step(states, "a", 5.0, start=True).tolist() == [0.0] * WIDTH
    assert step(states, "a", 6.0).tolist() == [5.0] * WIDTH


def test_the_rows_stay_within_the_limit_and_a_reused_row_starts_from_zeros() -> None:
    states, _ = store(max_episodes=4)
    for index in range(40):
        assert step(states, f"e{index}", float(index + 1)).tolist() == [0.0] * WIDTH
    assert len(states) == 4 and states.evicted == 36
    assert states.state_bytes == 4 * WIDTH * 4


def test_a_step_in_flight_blocks_the_next_and_a_failed_step_changes_nothing() -> None:
    states, _ = store()
    step(states, "a", 1.0)
    claim = states.claim([AgentRef("a"), AgentRef("new")], False, "1")
    with pytest.raises(RecurrentError) as raised:
        states.claim([AgentRef("a")], False, "1")
    assert raised.value.status == 409 and "in flight" in str(raised.value)
    states.release(claim)
    assert len(states) == 1  # the episode the failed step would have begun is not held
    assert step(states, "a", 2.0).tolist() == [1.0] * WIDTH


def test_a_switch_while_a_step_runs_keeps_the_episode_as_it_was() -> None:
    states, _ = store()
    step(states, "a", 1.0, version="1")
    claim = states.claim([AgentRef("a")], False, "1")
    with pytest.raises(RecurrentError) as raised:
        states.keep(claim, np.full((1, WIDTH), 9.0, np.float32), "2")  # answered by the new version
    assert raised.value.status == 409 and "began on version 1" in str(raised.value)
    with pytest.raises(RecurrentError):
        states.claim([AgentRef("a")], False, "2")
    assert step(states, "a", 1.0, version="2", start=True).tolist() == [0.0] * WIDTH


def test_expired_and_evicted_ids_are_remembered_within_a_bound() -> None:
    states, clock = store(max_episodes=2, expiry_s=10.0)
    step(states, "old", 1.0)
    clock.now = 11.0
    step(states, "x", 1.0)
    with pytest.raises(RecurrentError) as raised:
        step(states, "old", 1.0)
    assert raised.value.status == 409 and "expired" in str(raised.value) and states.expired == 1
    for index in range(10):
        step(states, f"n{index}", 1.0)
    assert len(states._forgotten) <= 2  # as many forgotten ids as held ones, at most
    assert step(states, "old", 1.0).tolist() == [0.0] * WIDTH  # forgotten long ago: a new episode
