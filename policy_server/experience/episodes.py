"""Episodes as this process knows them: each agent's step count, version and whether it ended.

The book decides, on the event loop and without the disk, what a step or an outcome is: the next
step index of an agent, or why an outcome cannot be taken (no such episode, no action yet, ended
already). It is bounded: beyond `capacity` agents the one idle longest is forgotten (an outcome
for it is then unknown), so a server that never hears an episode end does not grow.
"""

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from policy_server.experience.errors import EpisodeError

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
ID_RULE = "at most 128 characters from A-Z, a-z, 0-9 and . _ : -"
DEFAULT_CAPACITY = 100_000
SINGLE_AGENT = ""  # the agent_id of an episode whose requests name no agent
_ID = re.compile(ID_PATTERN)


class AgentRef(NamedTuple):
    """One agent of one episode; `agent_id` is SINGLE_AGENT when the requests name none. A named
    tuple: one is made for every logged request and is the episode book's key, and a tuple is
    built and hashed in C (a frozen dataclass's `__init__` and `__hash__` are Python's)."""

    episode_id: str
    agent_id: str = SINGLE_AGENT

    def __str__(self) -> str:
        return f"episode {self.episode_id!r}" + (f", agent {self.agent_id!r}" if self.agent_id else "")


def is_valid_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


@dataclass
class _Agent:
    steps: int = 0  # decisions in the current episode (a step after an end begins the next one)
    version: str = ""  # of the last decision
    ended: bool = False


@dataclass(frozen=True)
class Rewarded:
    """What an outcome rewards: the agent's last step, and the version that decided it (None:
    another API process served it; the export finds it by time)."""

    step: int | None
    version: str | None


def ended(ref: AgentRef) -> EpisodeError:
    return EpisodeError(409, f"{ref} has ended: its last action has its outcome already; a new step with these ids begins a new episode")


class EpisodeBook:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._agents: OrderedDict[AgentRef, _Agent] = OrderedDict()
        self._episodes: dict[str, int] = {}  # episode id → how many of its agents the book holds
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._agents)

    def step(self, ref: AgentRef, version: str) -> int:
        """The index of the agent's next step, counted: 0 for a new episode or after an end."""
        agent = self._agents.get(ref)
        if agent is None:
            agent = self._admit(ref)
        else:
            self._agents.move_to_end(ref)
        if agent.ended:
            agent.steps, agent.ended = 0, False
        agent.version = version
        agent.steps += 1
        return agent.steps - 1

    def outcome(self, ref: AgentRef, ends: bool) -> Rewarded:
        """The step an outcome rewards; with `ends`, the episode ends there. EpisodeError when
        the book knows no decision it could reward."""
        agent = self._agents.get(ref)
        if agent is None:
            raise EpisodeError(404, self._unknown(ref))
        if agent.ended:
            raise ended(ref)
        self._agents.move_to_end(ref)
        agent.ended = ends
        return Rewarded(agent.steps - 1, agent.version)

    def _unknown(self, ref: AgentRef) -> str:
        if ref.agent_id and ref.episode_id in self._episodes:
            return f"{ref} has no action yet: a reward follows the agent's first decision (a prediction naming these ids)"
        return (
            f"unknown {ref}: no decision of this policy named it (or it was idle longest of more than {self.capacity:,} agents); "
            "name it in a prediction first (?episode_id=...)"
        )

    def _admit(self, ref: AgentRef) -> _Agent:
        if len(self._agents) >= self.capacity:
            oldest, _ = self._agents.popitem(last=False)
            self._release(oldest.episode_id)
            self.forgotten += 1
        agent = self._agents[ref] = _Agent()
        self._episodes[ref.episode_id] = self._episodes.get(ref.episode_id, 0) + 1
        return agent

    def _release(self, episode_id: str) -> None:
        left = self._episodes[episode_id] - 1
        if left:
            self._episodes[episode_id] = left
        else:
            del self._episodes[episode_id]
