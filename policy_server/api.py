"""The FastAPI app: routes generated from the spec, auth, limits, error handlers, lifespan.

Knows nothing of model files: it gets a `PolicySpec` and an `Executor`. Route handlers turn the
validated body into rows (one vector op), hand a `Task` to the executor and answer with the
result already in JSON-ready lists, so the hot path does no per-feature Python work beyond
pydantic's validation.
"""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from policy_server import __version__
from policy_server.auth import api_key_dependency
from policy_server.docs import add_offline_docs
from policy_server.errors import InputError, PolicyFailure
from policy_server.executors import Executor
from policy_server.middleware import CanonicalPath, RequestBodyGuard
from policy_server.observations import (
    Distribution,
    RawObservation,
    RowEncoder,
    batch_decisions_model,
    batch_model,
    decision_model,
    example_observation,
    observation_model,
    raw_rows,
)
from policy_server.policy import Decisions, Kind, Task
from policy_server.schema import PolicySpec

logger = logging.getLogger("policy_server")

Seed = Annotated[
    int | None,
    Query(ge=0, le=2**64 - 1, description="Makes sampling reproducible: the same seed and observation give the same action."),
]


def json_response(content: Any, status_code: int = 200) -> Response:
    """Serialise once with the stdlib: the answers are plain lists and floats already."""
    return Response(json.dumps(content, separators=(",", ":"), allow_nan=False), status_code=status_code, media_type="application/json")


def create_app(spec: PolicySpec, executor: Executor, *, api_key: str | None, max_body_bytes: int) -> FastAPI:
    """The whole HTTP surface of one policy. `api_key=None` serves without auth (logged)."""
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if api_key is None:
            logger.warning("auth is OFF (POLICY_SERVER_AUTH=off): anyone who reaches this port can call the policy")
        await executor.start()
        info = executor.describe()
        logger.info(
            "Finished loading %s (%s) with backend %s, %s replica(s), on %s",
            info["model"],
            info["format"],
            executor.backend,
            info["replicas"],
            info["device"],
        )
        yield
        await executor.stop()

    app = FastAPI(
        title=f"{spec.name} policy",
        version=__version__,
        description=_description(spec, api_key is not None),
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
    )
    add_offline_docs(app)
    auth = [Depends(api_key_dependency(api_key))] if api_key is not None else []
    if spec.observations is not None:
        _add_observation_routes(app, spec, executor, auth)
    _add_raw_route(app, spec, executor, auth)
    _add_service_routes(app, spec, executor, auth, api_key is not None, started)
    _add_error_handlers(app)
    app.add_middleware(RequestBodyGuard, max_bytes=max_body_bytes)
    app.add_middleware(CanonicalPath, prefix=spec.url_path)
    return app


def _description(spec: PolicySpec, auth: bool) -> str:
    lines = [
        f"Decisions of the **{spec.name}** policy ({'discrete' if spec.discrete else 'continuous'} actions{', several heads' if spec.is_tuple else ''})."
    ]
    if auth:
        lines.append("Send the api key in the header `access-token: KEY` or `Authorization: Bearer KEY`.")
    if spec.url_path:
        lines.append(f"Every route is also served under `{spec.url_path}`, and with a trailing slash.")
    else:
        lines.append("Every route is also served with a trailing slash.")
    return "\n\n".join(lines)


def _decision(decisions: Decisions, row: int) -> dict[str, Any]:
    return {"actions": decisions.actions[row], "probability": decisions.probabilities[row]}


def _add_observation_routes(app: FastAPI, spec: PolicySpec, executor: Executor, auth: list[Any]) -> None:
    Observation = observation_model(spec)
    Decision = decision_model(spec)
    ObservationBatch = batch_model(Observation)
    encoder = RowEncoder(spec)
    example = example_observation(spec)

    def observation_route(path: str, kind: Kind, response_model: type[BaseModel], summary: str) -> None:
        async def endpoint(observation: Observation, seed: Seed = None) -> Response:  # type: ignore[valid-type]
            result = await executor.run(Task(encoder.encode([observation]), kind, seed))
            if isinstance(result, Decisions):
                return json_response(_decision(result, 0))
            return json_response({"heads": result[0]})

        app.post(
            path,
            operation_id=path.strip("/"),
            summary=summary,
            response_model=response_model,
            dependencies=auth,
            tags=["policy"],
            openapi_extra={"requestBody": {"content": {"application/json": {"example": example}}}},
        )(endpoint)

    observation_route("/predict", Kind.SAMPLE, Decision, "Sample an action from the policy")
    observation_route("/predict_deterministic", Kind.DETERMINISTIC, Decision, "The most likely action (continuous: the mean)")
    observation_route("/distribution", Kind.DISTRIBUTION, Distribution, "Every head's probabilities (continuous: mean and std)")

    @app.post(
        "/predict_batch",
        operation_id="predict_batch",
        summary="Actions for many observations in one call, answered in order",
        response_model=batch_decisions_model(Decision),
        dependencies=auth,
        tags=["policy"],
        openapi_extra={"requestBody": {"content": {"application/json": {"example": {"observations": [example, example]}}}}},
    )
    async def predict_batch(
        batch: ObservationBatch,  # type: ignore[valid-type]
        seed: Seed = None,
        deterministic: Annotated[bool, Query(description="The most likely actions instead of samples.")] = False,
    ) -> Response:
        observations = batch.observations  # type: ignore[attr-defined]
        if not observations:
            return json_response({"results": []})
        kind = Kind.DETERMINISTIC if deterministic else Kind.SAMPLE
        decisions = await executor.run(Task(encoder.encode(observations), kind, seed))
        assert isinstance(decisions, Decisions)
        return json_response({"results": [_decision(decisions, row) for row in range(len(observations))]})


def _add_raw_route(app: FastAPI, spec: PolicySpec, executor: Executor, auth: list[Any]) -> None:
    @app.post(
        "/predict_raw",
        operation_id="predict_raw",
        summary="Sample an action for a raw input vector",
        response_model=decision_model(spec),
        dependencies=auth,
        tags=["policy"],
    )
    async def predict_raw(body: RawObservation, seed: Seed = None) -> Response:
        decisions = await executor.run(Task(raw_rows(body), Kind.SAMPLE, seed))
        assert isinstance(decisions, Decisions)
        return json_response(_decision(decisions, 0))


def _add_service_routes(app: FastAPI, spec: PolicySpec, executor: Executor, auth: list[Any], auth_on: bool, started: float) -> None:
    @app.get("/schema", operation_id="schema", summary="The schema, without the api key", dependencies=auth, tags=["service"])
    async def schema() -> Response:
        policy = executor.describe() if executor.ready else {}
        return json_response(spec.public_dict() | {"input_size": policy.get("input_size", spec.input_size), "actions": policy.get("heads")})

    @app.get("/info", operation_id="info", summary="What is served, and where", dependencies=auth, tags=["service"])
    async def info() -> Response:
        policy = executor.describe() if executor.ready else {"backend": executor.backend}
        details = {"name": spec.name, "version": __version__, "auth": "on" if auth_on else "off", "ready": executor.ready}
        return json_response(policy | details | {"uptime_seconds": round(time.time() - started, 3)})

    @app.get("/health", operation_id="health", summary="Liveness", tags=["service"])
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready", operation_id="ready", summary="200 once the policy answers, 503 before", tags=["service"])
    async def ready() -> Response:
        if executor.ready:
            return json_response({"status": "ready"})
        return json_response({"detail": "The policy is still loading; retry shortly."}, status_code=503)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/docs")


def _add_error_handlers(app: FastAPI) -> None:
    async def input_error(request: Request, exc: InputError) -> Response:
        return json_response({"detail": exc.as_detail()}, status_code=422)

    async def policy_failure(request: Request, exc: PolicyFailure) -> Response:
        return json_response(
            {"detail": f"The policy failed on this request; the server log holds the traceback under error id {exc.error_id}."},
            status_code=500,
        )

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        if exc.status_code == 404:
            detail = f"No route {request.method} {request.url.path}: the routes are listed at /docs."
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}: see /docs for the method to use."
        return Response(json.dumps({"detail": detail}), status_code=exc.status_code, headers=exc.headers, media_type="application/json")

    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own handler echoes each bad input, which fails on NaN and can be huge.
        errors = [{key: error[key] for key in ("loc", "msg", "type") if key in error} for error in exc.errors()]
        return json_response({"detail": jsonable_encoder(errors)}, status_code=422)

    async def unexpected(request: Request, exc: Exception) -> Response:
        error_id = uuid.uuid4().hex[:12]
        logger.error("unexpected error on %s %s (error id %s)", request.method, request.url.path, error_id, exc_info=exc)
        return json_response({"detail": f"Internal error; the server log holds the traceback under error id {error_id}."}, status_code=500)

    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(InputError, input_error)  # type: ignore[arg-type]
    app.add_exception_handler(PolicyFailure, policy_failure)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
