"""The experience log's steps and outcomes → episodes, by the rules records.py states.

An agent's steps, in (time, step) order, and its outcomes, in time order, are merged: an outcome
belongs to the latest step at or before its time (a step and an outcome of the same microsecond:
the outcome is that step's), its reward is added to that step's, and with `terminated` or
`truncated` it ends the episode; the agent's next step begins a new one. An outcome with no step
of an open episode before it (none yet, or only steps of an episode that had already ended; the
server refuses both) rewards nothing: it is counted as unmatched.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

AgentKey = tuple[str, str]  # (episode_id, agent_id)


@dataclass(frozen=True)
class Outcome:
    """One outcome row: its time in microseconds since the epoch, and what it says."""

    time: int
    reward: float
    terminated: bool
    truncated: bool
    final_observation: Sequence[float] | None

    @property
    def ends(self) -> bool:
        return self.terminated or self.truncated


@dataclass
class Episode:
    """One episode of one agent: its steps (indices into the steps table, in order), the summed
    reward of each, and the outcome that ended it (None: still running when the log was read)."""

    key: AgentKey
    steps: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    end: Outcome | None = None


@dataclass(frozen=True)
class Joined:
    """Every episode of the log, and the outcomes that matched no step, as (key, outcome)."""

    episodes: list[Episode]
    unmatched: list[tuple[AgentKey, Outcome]]


def join(step_keys: Sequence[AgentKey], step_times: np.ndarray, outcomes: Sequence[tuple[AgentKey, Outcome]]) -> Joined:
    """`step_keys` and `step_times` (µs) per row of the steps table, sorted by (episode_id,
    agent_id, time, step); `outcomes` sorted by (episode_id, agent_id, time)."""
    steps_by_key = {key: list(rows) for key, rows in groupby(range(len(step_keys)), key=step_keys.__getitem__)}
    outcomes_by_key = {key: [outcome for _, outcome in group] for key, group in groupby(outcomes, key=lambda pair: pair[0])}
    episodes: list[Episode] = []
    unmatched: list[tuple[AgentKey, Outcome]] = []
    for key in sorted(steps_by_key.keys() | outcomes_by_key.keys()):
        rows = steps_by_key.get(key, [])
        agent_episodes, agent_unmatched = _join_agent(key, rows, [int(step_times[row]) for row in rows], outcomes_by_key.get(key, []))
        episodes.extend(agent_episodes)
        unmatched.extend((key, outcome) for outcome in agent_unmatched)
    return Joined(episodes, unmatched)


def _join_agent(key: AgentKey, rows: list[int], times: list[int], outcomes: list[Outcome]) -> tuple[list[Episode], list[Outcome]]:
    """One agent's episodes, and its outcomes that found no open episode."""
    episodes: list[Episode] = []
    unmatched: list[Outcome] = []
    current: Episode | None = None
    for event in _in_time_order(rows, times, outcomes):
        if isinstance(event, int):
            if current is None:
                current = Episode(key)
                episodes.append(current)
            current.steps.append(event)
            current.rewards.append(0.0)
        elif current is None:
            unmatched.append(event)
        else:
            current.rewards[-1] += event.reward
            if event.ends:
                current.end = event
                current = None
    return episodes, unmatched


def _in_time_order(rows: list[int], times: list[int], outcomes: list[Outcome]) -> Iterator[int | Outcome]:
    """Steps (their rows) and outcomes merged by time; on a tie the step comes first."""
    i = 0
    for outcome in outcomes:
        while i < len(rows) and times[i] <= outcome.time:
            yield rows[i]
            i += 1
        yield outcome
    yield from rows[i:]
