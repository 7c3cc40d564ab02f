"""Decisions that join an episode, and the routes that tell the log how they turned out.

`Decider` is what every decision route calls: it asks the log first (a step it could not keep is
refused with 503, before the model runs), decides, and logs the step. For a recurrent policy it
also claims the episodes' states from the policy's store, sends them with the rows and keeps the
new ones (policy_server/recurrent/states.py); a request that names no episode is refused (422),
since a policy with memory has no answer outside one. `POST /experience` gives an
agent's last action its reward (and ends the episode); `POST /collect_experience` serves the
original server's shape, an observation with the previous action's reward in, an action out.
Without logging for the policy, those two routes answer 404 saying how to turn it on.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from policy_server.experience.episodes import ID_PATTERN, ID_RULE, SINGLE_AGENT, AgentRef
from policy_server.experience.errors import EpisodeError
from policy_server.http.episodes import AgentId, EpisodeId
from policy_server.json_io import json_response
from policy_server.lifecycle import ServedPolicy
from policy_server.observations import RowEncoder, float32_rows, observation_model
from policy_server.policy import Decisions, Distributions, Kind, Task
from policy_server.recurrent.errors import RecurrentError
from policy_server.recurrent.states import Claim, EpisodeStates

if TYPE_CHECKING:
    from policy_server.experience.log import ExperienceLog
    from policy_server.http.policy_routes import Placement

COLLECT_EPISODE = "collect"  # /collect_experience's episode when the request names none
_ID = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


@dataclass(frozen=True)
class Decider:
    served: ServedPolicy
    log: "ExperienceLog | None"

    async def decide(
        self, rows: np.ndarray, kind: Kind, seed: int | None, refs: Sequence[AgentRef | None] | None, start: bool = False
    ) -> tuple[Decisions, list[int] | None]:
        """The decisions for `rows` and, when the policy logs and rows name episodes (a ref each,
        None for a row of none), the step indices of those rows. `start`: the episodes named
        begin here (a recurrent policy's state starts from zeros)."""
        log = self.log if refs is not None else None
        if log is not None:
            log.admit()
        memory = self.served.memory
        if memory is None:
            decisions = await self.served.admission.run(Task(rows, kind, seed))
        else:
            claim = memory.claim(self._episodes(refs), start, self.served.active)
            decisions = await self._run_claimed(Task(rows, kind, seed, claim.state), memory, claim)
            assert isinstance(decisions, Decisions) and decisions.state is not None
            memory.keep(claim, decisions.state, decisions.version)
        assert isinstance(decisions, Decisions)
        if self.served.metrics is not None:
            self.served.metrics.count_actions(decisions)
        if log is None or refs is None:
            return decisions, None
        agents = [ref for ref in refs if ref is not None]
        logged_rows, logged = rows, decisions
        if len(agents) < len(refs):
            kept = [i for i, ref in enumerate(refs) if ref is not None]
            logged_rows, logged = rows[kept], decisions.take(kept)
        steps = await log.record_steps(self.served.spec, agents, logged_rows, logged, deterministic=kind is Kind.DETERMINISTIC)
        return decisions, steps

    async def distribution(self, rows: np.ndarray, seed: int | None, refs: list[AgentRef] | None) -> Distributions:
        """Every head's distribution for the rows; a recurrent policy's from the episode's state,
        which this does not advance (the episode's next step starts from the same state)."""
        memory = self.served.memory
        if memory is None:
            result = await self.served.admission.run(Task(rows, Kind.DISTRIBUTION, seed))
        else:
            claim = memory.claim(self._episodes(refs), False, self.served.active)
            result = await self._run_claimed(Task(rows, Kind.DISTRIBUTION, seed, claim.state), memory, claim)
            memory.release(claim)
        assert isinstance(result, Distributions)
        return result

    async def _run_claimed(self, task: Task, memory: EpisodeStates, claim: Claim) -> Decisions | Distributions:
        """The task's result; its episodes released if it fails (or the client goes away). The
        store is the one claimed from: a schema change meanwhile may have given the policy another."""
        try:
            result = await self.served.admission.run(task)
        except BaseException:
            memory.release(claim)
            raise
        assert isinstance(result, Decisions | Distributions)
        return result

    def _episodes(self, refs: Sequence[AgentRef | None] | None) -> list[AgentRef]:
        if refs is None or any(ref is None for ref in refs):
            raise RecurrentError(
                422,
                f"policy '{self.served.name}' is recurrent (it keeps each episode's memory): name the episode of every observation "
                "with ?episode_id=... (and agent_id for several agents; in a batch, per observation or in the query)",
            )
        return [ref for ref in refs if ref is not None]

    async def answer_one(
        self, rows: np.ndarray, kind: Kind, seed: int | None, refs: list[AgentRef] | None, start: bool = False
    ) -> Response:
        decisions, steps = await self.decide(rows, kind, seed, refs, start)
        return json_response(
            {"actions": decisions.actions[0], "probability": decisions.probabilities[0]}, headers=self.headers(decisions, steps)
        )

    def headers(self, decisions: Decisions, steps: list[int] | None) -> dict[str, str]:
        """Who answered, and the step logged for a single decision."""
        headers = {"X-Policy-Name": self.served.name, "X-Policy-Version": decisions.version}
        if steps is not None:
            headers["X-Episode-Step"] = str(steps[0])
        return headers


class OutcomeAnswer(BaseModel):
    episode_id: str
    agent_id: str = Field(description="Empty for an episode of one agent.")
    step: int | None = Field(
        description="The step rewarded: the agent's last decision in the episode, counted from 0 (null: another API process served it)."
    )
    version: str | None = Field(description="The policy version that made that decision (null likewise).")
    ended: bool


def add_experience_routes(router: APIRouter, decider: Decider, place: "Placement") -> None:
    """/experience (and /collect_experience for a schema of named observations) on `router`, whose
    routes take one JSON body (PredictionRoute)."""
    spec = decider.served.spec
    encoder = RowEncoder(spec) if spec.observations is not None else None
    Observation: Any = observation_model(spec, place.model_prefix) if encoder is not None else list[float]
    log = decider.log
    assert log is not None

    def final_row(observation: Any) -> np.ndarray:
        return encoder.encode([observation]) if encoder is not None else float32_rows([observation], ("body", "observation"))

    OutcomeBody = create_model(
        f"{place.model_prefix}Outcome",
        __config__=ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"),
        episode_id=(_ID, Field(description=f"The episode, as the predictions named it ({ID_RULE}).")),
        agent_id=(_ID | None, Field(None, description="The agent, when the episode has several.")),
        reward=(float, Field(description="The reward of the agent's last action.")),
        terminated=(bool, Field(False, description="The episode ended (a terminal state): the next step with these ids begins a new one.")),
        truncated=(bool, Field(False, description="The episode was cut short (a time limit): it ends too.")),
        observation=(Observation | None, Field(None, description="The observation after the last action (the final one, when it ends).")),
        info=(dict[str, Any] | None, Field(None, description="Anything else to keep with the outcome, as a JSON object.")),
    )

    async def experience(outcome: OutcomeBody) -> Response:  # type: ignore[valid-type]
        from policy_server.experience.log import Outcome

        ref = AgentRef(outcome.episode_id, outcome.agent_id or SINGLE_AGENT)
        log.admit()
        row = None if outcome.observation is None else final_row(outcome.observation)
        info = None if outcome.info is None else orjson.dumps(outcome.info).decode()
        ends = outcome.terminated or outcome.truncated
        rewarded = await log.record_outcome(ref, Outcome(outcome.reward, outcome.terminated, outcome.truncated, row, info))
        answer = OutcomeAnswer(episode_id=ref.episode_id, agent_id=ref.agent_id, step=rewarded.step, version=rewarded.version, ended=ends)
        return json_response(answer.model_dump(), headers={"X-Policy-Name": decider.served.name})  # counted under its policy

    router.add_api_route(
        "/experience",
        experience,
        methods=["POST"],
        operation_id=place.operation_id("experience"),
        summary="The reward of an agent's last action; ends its episode when terminated or truncated",
        response_model=OutcomeAnswer,
        responses={404: {"description": "No decision named this episode and agent"}, 409: {"description": "The episode has ended"}},
    )
    if encoder is not None:
        _add_collect_route(router, decider, place, Observation, encoder)


def _add_collect_route(router: APIRouter, decider: Decider, place: "Placement", Observation: Any, encoder: RowEncoder) -> None:
    from policy_server.experience.log import Outcome

    log = decider.log
    assert log is not None
    CollectBody = create_model(
        f"{place.model_prefix}CollectedExperience",
        __config__=ConfigDict(strict=True, allow_inf_nan=False),
        observation=(Observation, Field(description="What the agent observes now.")),
        reward=(float, Field(0.0, description="The reward of the agent's previous action (ignored on an episode's first call).")),
        done=(bool, Field(False, description="The episode ended with this observation.")),
    )

    async def collect_experience(
        body: CollectBody,  # type: ignore[valid-type]
        episode_id: EpisodeId = None,
        agent_id: AgentId = None,
    ) -> Response:
        ref = AgentRef(episode_id or COLLECT_EPISODE, agent_id or SINGLE_AGENT)
        rows = encoder.encode([body.observation])
        log.admit()
        with contextlib.suppress(EpisodeError):  # the episode's first call: no previous action to reward
            await log.record_outcome(ref, Outcome(body.reward, terminated=body.done, final_observation=rows if body.done else None))
        decisions, steps = await decider.decide(rows, Kind.SAMPLE, None, None if body.done else [ref])
        answer = {"actions": decisions.actions[0], "probability": decisions.probabilities[0], "done": body.done}
        return json_response(answer, headers=decider.headers(decisions, steps))

    router.add_api_route(
        "/collect_experience",
        collect_experience,
        methods=["POST"],
        operation_id=place.operation_id("collect_experience"),
        summary="The original server's shape: an observation and the previous action's reward in, the next action out",
    )


def add_logging_off_routes(router: APIRouter, served: ServedPolicy) -> None:
    """/experience and /collect_experience for a policy that logs nothing: a 404 saying how to log."""
    detail = (
        f"policy '{served.name}' does not log experience: add 'experience: {{dir: experience}}' to its schema.yaml "
        "or set POLICY_SERVER_EXPERIENCE_DIR, and restart"
    )

    async def logging_off() -> Response:
        raise EpisodeError(404, detail)

    for path in ("/experience", "/collect_experience"):
        router.add_api_route(path, logging_off, methods=["POST"], include_in_schema=False)
