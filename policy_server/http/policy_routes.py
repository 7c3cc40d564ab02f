"""One policy's routes, built from its schema: the predictions, and its /schema and /info.

Built once per policy (again when its schema changes) for each place it is served: under
`/policies/{name}`, and at the root for the default policy. The handlers hold the `ServedPolicy`,
not a version: each request runs on the version active when it is accepted, and its answer
names that version in `X-Policy-Name` and `X-Policy-Version`.
"""

import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel

from policy_server import __version__
from policy_server.http.context import ServerContext
from policy_server.http.episodes import AgentId, EpisodeId, EpisodeStart, batch_agents, one_agent
from policy_server.http.errors import ErrorDetail
from policy_server.http.experience_routes import Decider, add_experience_routes, add_logging_off_routes
from policy_server.http.keys import KeyCheck
from policy_server.http.routes import GuardedRoute, PredictionRoute
from policy_server.json_io import json_response
from policy_server.lifecycle import ServedPolicy
from policy_server.observations import (
    Distribution,
    PlainBatchReader,
    RowEncoder,
    batch_decisions_model,
    batch_model,
    decision_model,
    episode_keys_of,
    example_observation,
    observation_model,
    raw_observation_model,
    raw_rows,
)
from policy_server.policy import Kind

Seed = Annotated[
    int | None,
    Query(ge=0, le=2**64 - 1, description="Makes sampling reproducible: the same seed and observation give the same action."),
]
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "No api key sent"},
    403: {"model": ErrorDetail, "description": "Wrong api key (another policy's, say)"},
}


@dataclass(frozen=True)
class Placement:
    """Where a policy's routes are served: `prefix` ("" for the root) and the names that keep
    its operation ids and models apart from other policies' (empty for the root routes)."""

    prefix: str
    operation_prefix: str
    model_prefix: str

    @classmethod
    def root(cls) -> "Placement":
        return cls("", "", "")

    @classmethod
    def under_policies(cls, name: str) -> "Placement":
        slug = re.sub(r"\W+", "_", name)
        return cls(f"/policies/{name}", f"{slug}_", "".join(part.capitalize() for part in re.split(r"[\W_]+", name)))

    def operation_id(self, route: str) -> str:
        return f"{self.operation_prefix}{route}"


def policy_routers(served: ServedPolicy, api_key: str | None, place: Placement, server: ServerContext) -> list[APIRouter]:
    """The policy's prediction routes and its service routes, keyed by its own key (None: auth off)."""
    guard: dict[str, Any] = {}
    if api_key is not None:
        guard = {"dependencies": [Depends(KeyCheck(api_key))], "responses": AUTH_ERRORS}
    tag = "policy" if not place.prefix else f"policy {served.name}"
    predictions = APIRouter(prefix=place.prefix, tags=[tag], route_class=PredictionRoute, **guard)
    decider = Decider(served, server.experience.for_policy(served.spec))
    _add_raw_route(predictions, decider, place)
    if served.spec.observations is not None:
        _add_observation_routes(predictions, decider, place)
    service = APIRouter(prefix=place.prefix, tags=["service" if not place.prefix else tag], route_class=GuardedRoute, **guard)
    if decider.log is not None:
        add_experience_routes(predictions, decider, place)
    else:
        add_logging_off_routes(service, served)
    _add_description_routes(service, served, place, server)
    return [predictions, service]


def _headers(served: ServedPolicy, version: str) -> dict[str, str]:
    return {"X-Policy-Name": served.name, "X-Policy-Version": version}


def _add_observation_routes(router: APIRouter, decider: Decider, place: Placement) -> None:
    served = decider.served
    spec = served.spec
    Observation = observation_model(spec, place.model_prefix)
    Decision = decision_model(spec, place.model_prefix)
    ObservationBatch = batch_model(Observation, place.model_prefix)
    encoder = RowEncoder(spec)
    example = example_observation(spec)

    def add_route(path: str, endpoint: Any, response_model: type[BaseModel], summary: str) -> None:
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            operation_id=place.operation_id(path.strip("/")),
            summary=summary,
            response_model=response_model,
            openapi_extra={"requestBody": {"content": {"application/json": {"example": example}}}},
        )

    def decision_route(path: str, kind: Kind, summary: str) -> None:
        async def decide(
            observation: Observation,  # type: ignore[valid-type]
            seed: Seed = None,
            episode_id: EpisodeId = None,
            agent_id: AgentId = None,
            episode_start: EpisodeStart = False,
        ) -> Response:
            return await decider.answer_one(encoder.encode([observation]), kind, seed, one_agent(episode_id, agent_id), episode_start)

        add_route(path, decide, Decision, summary)

    async def distribution(observation: Observation, seed: Seed = None, episode_id: EpisodeId = None, agent_id: AgentId = None) -> Response:  # type: ignore[valid-type]
        result = await decider.distribution(encoder.encode([observation]), seed, one_agent(episode_id, agent_id))
        return json_response({"heads": result.rows[0]}, headers=_headers(served, result.version))

    decision_route("/predict", Kind.SAMPLE, "Sample an action from the policy")
    decision_route("/predict_deterministic", Kind.DETERMINISTIC, "The most likely action (continuous: the mean)")
    add_route("/distribution", distribution, Distribution, "Every head's probabilities (continuous: mean and std)")

    async def answer_rows(
        rows: np.ndarray,
        seed: int | None = None,
        deterministic: bool = False,
        episode_id: str | None = None,
        named: list[tuple[str | None, str | None]] | None = None,
        episode_start: bool = False,
    ) -> Response:
        kind = Kind.DETERMINISTIC if deterministic else Kind.SAMPLE
        decisions, _ = await decider.decide(rows, kind, seed, batch_agents(len(rows), episode_id, named), episode_start)
        results = [{"actions": a, "probability": p} for a, p in zip(decisions.actions, decisions.probabilities, strict=True)]
        return json_response({"results": results}, headers=_headers(served, decisions.version))

    async def predict_batch(
        batch: ObservationBatch,  # type: ignore[valid-type]
        seed: Seed = None,
        deterministic: Annotated[bool, Query(description="The most likely actions instead of samples.")] = False,
        episode_id: EpisodeId = None,
        episode_start: Annotated[bool, Query(description="A recurrent policy: every episode of the batch begins here.")] = False,
    ) -> Response:
        if not batch.observations:
            return json_response({"results": []}, headers={"X-Policy-Name": served.name})
        named = episode_keys_of(batch.observations, spec)
        return await answer_rows(encoder.encode(batch.observations), seed, deterministic, episode_id, named, episode_start)

    router.add_api_route(
        "/predict_batch",
        predict_batch,
        methods=["POST"],
        operation_id=place.operation_id("predict_batch"),
        summary="Actions for many observations in one call, answered in order",
        response_model=batch_decisions_model(Decision, place.model_prefix),
        openapi_extra={"requestBody": {"content": {"application/json": {"example": {"observations": [example, example]}}}}},
    )
    reader = PlainBatchReader.of(spec)
    batch_route = router.routes[-1]
    if reader is not None and isinstance(batch_route, PredictionRoute):
        batch_route.read_rows_with(reader.rows, answer_rows)


def _add_raw_route(router: APIRouter, decider: Decider, place: Placement) -> None:
    served = decider.served
    input_size = served.executor.describe().get("input_size")  # local: the model's, known before start; ray: the schema's
    RawBody = raw_observation_model(served.spec, input_size, place.model_prefix)

    async def predict_raw(
        body: RawBody,  # type: ignore[valid-type]
        seed: Seed = None,
        episode_id: EpisodeId = None,
        agent_id: AgentId = None,
        episode_start: EpisodeStart = False,
    ) -> Response:
        return await decider.answer_one(raw_rows(body), Kind.SAMPLE, seed, one_agent(episode_id, agent_id), episode_start)

    router.add_api_route(
        "/predict_raw",
        predict_raw,
        methods=["POST"],
        operation_id=place.operation_id("predict_raw"),
        summary="Sample an action for a raw input vector",
        response_model=decision_model(served.spec, place.model_prefix),
    )


def _add_description_routes(router: APIRouter, served: ServedPolicy, place: Placement, server: ServerContext) -> None:
    async def schema() -> Response:
        policy = served.executor.describe() if served.executor.ready else {}
        spec = served.spec
        body = spec.public_dict() | {"input_size": policy.get("input_size", spec.input_size), "actions": policy.get("heads")}
        return json_response(body, headers={"X-Policy-Name": served.name, "X-Policy-Version": served.active})

    async def info() -> Response:
        executor, admission = served.executor, served.admission
        policy = executor.describe() if executor.ready else {"backend": executor.backend}
        details = {
            "name": served.name,
            "version": __version__,
            "policy_version": served.active,
            "auth": "on" if server.auth_on else "off",
            "ready": executor.ready,
        }
        queue = {"max_queue": admission.limit, "queued": admission.admitted, "shed": admission.shed, "draining": server.drain.draining}
        log = server.experience.for_policy(served.spec)
        experience = {"experience": None if log is None else log.describe()}
        recurrent = {"recurrent": None if served.memory is None else served.memory.describe()}
        uptime = {"uptime_seconds": round(time.time() - server.started, 3)}
        return json_response(policy | details | queue | experience | recurrent | uptime)

    router.add_api_route(
        "/schema", schema, methods=["GET"], operation_id=place.operation_id("schema"), summary="The schema, without the api key"
    )
    router.add_api_route("/info", info, methods=["GET"], operation_id=place.operation_id("info"), summary="What is served, and where")
