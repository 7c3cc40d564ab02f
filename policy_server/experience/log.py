"""One policy's experience log: what the routes call when a request names an episode.

`admit()` first (before the model runs: a step the log could not keep is refused, not served),
then `record_steps()` or `record_outcome()` with what was answered. Both only touch memory; the
writer's thread does the disk (writer.py).
"""

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.experience.episodes import AgentRef, EpisodeBook, Rewarded, ended
from policy_server.experience.errors import EpisodeError, ExperienceUnavailable
from policy_server.experience.records import OUTCOMES, STEPS
from policy_server.experience.shared import SharedEpisodes
from policy_server.experience.tables import OutcomePiece, StepPiece, StepTable, outcomes_table
from policy_server.experience.writer import ExperienceWriter, Partition
from policy_server.policy import Decisions
from policy_server.schema import Experience, PolicySpec

_DAY_US = 86_400_000_000


@dataclass(frozen=True)
class Outcome:
    """What `POST .../experience` tells of an agent's last action."""

    reward: float
    terminated: bool = False
    truncated: bool = False
    final_observation: np.ndarray | None = None  # one row
    info: str | None = None  # a JSON object, as text


class ExperienceLog:
    """`shared`: several API processes serve this policy; the episodes they begin and end are
    shared through the file shared.py keeps, so an outcome finds its episode in any of them."""

    def __init__(self, config: Experience, policy: str, shared: bool = False) -> None:
        self.config = config
        self.policy = policy
        self.book = EpisodeBook()
        self.writer = ExperienceWriter(config, policy)
        self.shared = SharedEpisodes(config.dir, policy) if shared else None
        self.refused = 0
        self._process = f"{socket.gethostname()}:{os.getpid()}"
        self._spec: PolicySpec | None = None  # a schema change brings a new spec, and a new table layout
        self._partitions: dict[tuple[str, str, int], Partition] = {}

    def start(self) -> None:
        self.writer.start()

    def close(self) -> None:
        self.writer.close()
        if self.shared is not None:
            self.shared.close()

    def admit(self) -> None:
        refusal = self.writer.refusal()
        if refusal is not None:
            self.refused += 1
            raise ExperienceUnavailable(refusal, self.writer.retry_after_s)

    async def record_steps(
        self, spec: PolicySpec, refs: Sequence[AgentRef], rows: np.ndarray, decisions: Decisions, deterministic: bool
    ) -> list[int]:
        """Log one request's decisions, row by row; the step index of each."""
        assert decisions.head_probabilities is not None and decisions.head_log_probabilities is not None
        assert decisions.action_values is not None
        steps = [self.book.step(ref, decisions.version) for ref in refs]
        if self.shared is not None and 0 in steps:  # known to the other processes before the answer leaves
            await self.shared.begin([ref for ref, step in zip(refs, steps, strict=True) if step == 0])
        now = time.time_ns() // 1000
        piece = StepPiece(
            tuple([ref.episode_id for ref in refs]),
            tuple([ref.agent_id for ref in refs]),
            tuple(steps),
            now,
            rows,
            decisions.action_values,
            decisions.head_probabilities,
            decisions.head_log_probabilities,
            deterministic,
        )
        self.writer.put(self._steps_partition(spec, decisions.version, now), piece, len(refs))
        return steps

    async def record_outcome(self, ref: AgentRef, outcome: Outcome) -> Rewarded:
        ends = outcome.terminated or outcome.truncated
        rewarded = self.book.outcome(ref, ends) if self.shared is None else await self._shared_outcome(ref, ends)
        now = time.time_ns() // 1000
        final = None if outcome.final_observation is None else outcome.final_observation.reshape(-1).tolist()
        piece = OutcomePiece(
            ref.episode_id,
            ref.agent_id,
            now,
            rewarded.version,
            rewarded.step,
            outcome.reward,
            outcome.terminated,
            outcome.truncated,
            final,
            outcome.info,
        )
        self.writer.put(self._outcomes_partition(now), piece, 1)
        return rewarded

    async def _shared_outcome(self, ref: AgentRef, ends: bool) -> Rewarded:
        """What the processes together know: the shared file says whether the episode runs; this
        process's book, when it served the step, which step and version are rewarded."""
        assert self.shared is not None
        state = await self.shared.state(ref)
        if state is None:
            return self.book.outcome(ref, ends)  # its 404, telling an unknown episode from an agent without an action
        if state.ended:
            raise ended(ref)
        try:
            rewarded = self.book.outcome(ref, ends)
        except EpisodeError:  # another process served the agent's last step
            rewarded = Rewarded(None, None)
        if ends:
            await self.shared.end(ref)
        return rewarded

    def describe(self) -> dict[str, Any]:
        """For /info: where the log goes and whether it keeps up."""
        state = self.writer.state
        return {
            "dir": str(self.config.dir),
            "state": "failing" if state.error else "behind" if self.writer.refusal() else "ok",
            "error": state.error,
            "pending_rows": state.pending_rows,
            "written_rows": state.written_rows,
            "files_written": state.files,
            "refused_requests": self.refused,
            "episodes_held": len(self.book),
        }

    def _steps_partition(self, spec: PolicySpec, version: str, now_us: int) -> Partition:
        if spec is not self._spec:
            self._spec, self._step_table = spec, StepTable(spec, self._process)
            self._partitions = {key: partition for key, partition in self._partitions.items() if key[0] == OUTCOMES}
        key = (STEPS, version, now_us // _DAY_US)
        partition = self._partitions.get(key)
        if partition is None:
            path = self.config.dir / STEPS / f"policy={self.policy}" / f"version={version}" / f"date={_date(now_us)}"
            partition = self._partitions[key] = Partition(path, self._step_table)
        return partition

    def _outcomes_partition(self, now_us: int) -> Partition:
        key = (OUTCOMES, "", now_us // _DAY_US)
        partition = self._partitions.get(key)
        if partition is None:
            path = self.config.dir / OUTCOMES / f"policy={self.policy}" / f"date={_date(now_us)}"
            partition = self._partitions[key] = Partition(path, outcomes_table)
        return partition


def _date(time_us: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time_us // 1_000_000))
