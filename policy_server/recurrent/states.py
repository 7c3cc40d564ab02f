"""Each episode's state between its steps, for one recurrent policy: bounded, expiring, pinned.

The store lives with the routes (one per served policy, on the event loop, no lock needed): a
step claims its episodes' states, which travel with the rows in the `Task` (so executors and Ray
replicas stay stateless), and keeps the new states the decisions bring back. An episode is an
`AgentRef` (episode id and agent id, as the experience log names them).

- A new episode, or one named with `episode_start`, starts from zeros.
- At most `max_episodes` are held; beyond, the least recently used is forgotten ("evicted").
  Episodes idle `idle_expiry_s` are forgotten too ("expired"): they sit at the front of the LRU
  order, so each claim drops them in O(1) each.
- A forgotten episode's next step answers 409 (its memory is gone: starting it from zeros would
  silently change what the policy does); as many forgotten ids as held ones are remembered,
  so that memory stays bounded too. `episode_start` begins it again.
- An episode is pinned to the version that answered its first step: once another version is
  active, its steps answer 409 and `episode_start` begins it on the new one. Keeping retired
  versions loaded would hold two models (two Ray deployments) per switch for as long as any
  episode of the old one lives; a clear 409 keeps one version serving, and an episode's steps
  never mix two policies.
- One step of an episode at a time: a second one while the first is in flight answers 409 (its
  state would be the one before the first step).

The states themselves are rows of one float32 array (`StateRows`), not an array per episode:
100,000 small arrays freed and allocated in any order leave the heap in fragments that RSS never
gives back, and each would be one more object for the garbage collector to scan.
"""

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.experience.episodes import AgentRef
from policy_server.recurrent.errors import RecurrentError
from policy_server.schema import Recurrent

EXPIRED = "expired"
EVICTED = "evicted"


class StateRows:
    """Rows of `width` float32 values, one per slot, in one array that grows by doubling up to
    `limit` rows; a slot given back is taken again before the array grows."""

    FIRST_ROWS = 64

    def __init__(self, width: int, limit: int) -> None:
        self.array = np.zeros((0, width), np.float32)
        self.limit = limit
        self._free: list[int] = []

    def take(self) -> int:
        if not self._free:
            self._grow()
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def _grow(self) -> None:
        size = len(self.array)
        rows = min(max(2 * size, self.FIRST_ROWS), self.limit)
        assert rows > size, "more slots taken than the limit"
        grown = np.zeros((rows, self.array.shape[1]), np.float32)
        grown[:size] = self.array
        self.array = grown
        self._free.extend(range(rows - 1, size - 1, -1))


@dataclass
class _Held:
    slot: int  # its row in StateRows
    version: str  # that answered the episode's first step; "" until it is answered
    last_used: float
    in_flight: bool = False


@dataclass(frozen=True)
class Claim:
    """The episodes of one request's rows, claimed for one step: their states [rows, width]."""

    refs: tuple[AgentRef, ...]
    state: np.ndarray
    fresh: tuple[bool, ...]  # the row's episode starts here (new, or episode_start)


class EpisodeStates:
    def __init__(self, recurrent: Recurrent, policy: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.recurrent = recurrent
        self.policy = policy
        self.evicted = 0
        self.expired = 0
        self._clock = clock
        self._rows = StateRows(recurrent.width, recurrent.max_episodes)
        self._held: OrderedDict[AgentRef, _Held] = OrderedDict()  # least recently used first
        self._forgotten: OrderedDict[AgentRef, str] = OrderedDict()  # why each was forgotten

    def __len__(self) -> int:
        return len(self._held)

    @property
    def state_bytes(self) -> int:
        """The bytes of the state rows allocated (at most max_episodes rows; each episode's entry
        adds a few hundred bytes of Python objects: bench/RESULTS.md)."""
        return self._rows.array.nbytes

    def claim(self, refs: Sequence[AgentRef], start: bool, active: str) -> Claim:
        """The state of each ref's episode for its next step on version `active`, each marked in
        flight until `keep` or `release`; a RecurrentError if any step cannot be taken."""
        now = self._clock()
        self._expire(now)
        if len(set(refs)) != len(refs):
            twice = next(ref for i, ref in enumerate(refs) if ref in refs[:i])
            raise RecurrentError(
                422,
                f"the batch names {twice} twice: a recurrent policy takes one step of an agent per request, each from the state of the last",
            )
        if len(refs) > self.recurrent.max_episodes:
            raise RecurrentError(
                422, f"the batch names {len(refs)} episodes; recurrent policy '{self.policy}' keeps {self.recurrent.max_episodes:,} at most"
            )
        for ref in refs:
            self._check(ref, start, active)
        slots, fresh = [], []
        for ref in refs:
            held = self._held.get(ref)
            fresh.append(start or held is None)
            if held is None:
                held = self._admit(ref, now)
            self._forgotten.pop(ref, None)
            self._held.move_to_end(ref)
            held.in_flight = True
            slots.append(held.slot)
        state = self._rows.array[slots]  # a copy: the rows may move on before the step is answered
        state[np.array(fresh)] = 0.0
        return Claim(tuple(refs), state, tuple(fresh))

    def keep(self, claim: Claim, new_state: np.ndarray, version: str) -> None:
        """The step was answered by `version`: each episode's state is now `new_state`'s row. If an
        episode began on another version (a switch while the step ran), nothing changes: 409."""
        for ref, fresh in zip(claim.refs, claim.fresh, strict=True):
            held = self._held.get(ref)
            if not fresh and held is not None and held.version != version:
                self.release(claim)
                raise RecurrentError(409, self._retired(ref, held.version, version))
        now = self._clock()
        slots = []
        for ref in claim.refs:
            held = self._held.get(ref)
            if held is None:  # evicted while in flight (more steps in flight than max_episodes): it is the newest now
                held = self._admit(ref, now)
                self._forgotten.pop(ref, None)
            held.version, held.last_used, held.in_flight = version, now, False
            self._held.move_to_end(ref)
            slots.append(held.slot)
        self._rows.array[slots] = new_state

    def release(self, claim: Claim) -> None:
        """The step failed: its episodes keep the state they had; those it would have begun go."""
        for ref, fresh in zip(claim.refs, claim.fresh, strict=True):
            held = self._held.get(ref)
            if held is None:
                continue
            held.in_flight = False
            if fresh and not held.version:
                del self._held[ref]
                self._rows.give_back(held.slot)

    def describe(self) -> dict[str, Any]:
        self._expire(self._clock())
        return {
            "episodes": len(self._held),
            "max_episodes": self.recurrent.max_episodes,
            "idle_expiry_seconds": self.recurrent.idle_expiry_s,
            "state_size": self.recurrent.width,
            "state_bytes": self.state_bytes,
            "evicted": self.evicted,
            "expired": self.expired,
        }

    def _check(self, ref: AgentRef, start: bool, active: str) -> None:
        held = self._held.get(ref)
        if held is not None and held.in_flight:
            raise RecurrentError(
                409, f"a step of {ref} is in flight: send each episode's steps one at a time, each after the last's answer"
            )
        if start:
            return
        if held is None and ref in self._forgotten:
            raise RecurrentError(409, self._gone(ref, self._forgotten[ref]))
        if held is not None and held.version and held.version != active:
            raise RecurrentError(409, self._retired(ref, held.version, active))

    def _gone(self, ref: AgentRef, why: str) -> str:
        cause = (
            f"was idle more than {self.recurrent.idle_expiry_s:g} s"
            if why == EXPIRED
            else f"was the least recently used of more than {self.recurrent.max_episodes:,} episodes"
        )
        return (
            f"{ref} of recurrent policy '{self.policy}' {why}: it {cause}, and its memory is gone; begin it again with episode_start=true"
        )

    def _retired(self, ref: AgentRef, version: str, active: str) -> str:
        return (
            f"{ref} began on version {version} of '{self.policy}', which is no longer served (version {active} is): "
            "an episode keeps its version; begin it again with episode_start=true"
        )

    def _admit(self, ref: AgentRef, now: float) -> _Held:
        while len(self._held) >= self.recurrent.max_episodes:
            oldest, held = next(iter(self._held.items()))
            self._forget(oldest, held, EVICTED)
        held = self._held[ref] = _Held(self._rows.take(), "", now)
        return held

    def _expire(self, now: float) -> None:
        deadline = now - self.recurrent.idle_expiry_s
        while self._held:
            ref, held = next(iter(self._held.items()))
            if held.last_used > deadline or held.in_flight:
                return
            self._forget(ref, held, EXPIRED)

    def _forget(self, ref: AgentRef, held: _Held, why: str) -> None:
        del self._held[ref]
        self._rows.give_back(held.slot)
        if not held.version:  # never answered: nothing to remember
            return
        if why == EXPIRED:
            self.expired += 1
        else:
            self.evicted += 1
        self._forgotten[ref] = why
        self._forgotten.move_to_end(ref)
        while len(self._forgotten) > self.recurrent.max_episodes:
            self._forgotten.popitem(last=False)
