"""The FastAPI app: routes generated from the spec, auth, limits, error handlers, lifespan.

Knows nothing of model files: it gets a `PolicySpec` and an `Executor`. Route handlers turn the
validated body into rows (one vector op), hand a `Task` to the executor and answer with the
result already in JSON-ready lists, so the hot path does no per-feature Python work beyond
pydantic's validation.
"""

import asyncio
import gc
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import BaseModel, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from policy_server import __version__
from policy_server.admission import Admission, Overloaded
from policy_server.auth import SECURITY_REQUIREMENT, SECURITY_SCHEMES, KeyGate, guarded_routes
from policy_server.clients import LANGUAGES, ClientSDKError, ClientSDKs, SDKsNotReady, UnknownLanguage
from policy_server.docs import add_offline_docs
from policy_server.drain import Drain, DrainMiddleware
from policy_server.errors import ConfigError, InputError, PolicyFailure
from policy_server.executors import Executor
from policy_server.fast_lane import FastLane, FastRoute
from policy_server.json_io import OrjsonRoute, json_response
from policy_server.metrics import Metrics, RequestMetrics
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
    raw_observation_model,
    raw_rows,
)
from policy_server.policy import Decisions, Kind, Task
from policy_server.redaction import redact, register_secret
from policy_server.schema import PolicySpec
from policy_server.settings import DEFAULT_DRAIN_S, DEFAULT_MAX_QUEUE

logger = logging.getLogger("policy_server")

Seed = Annotated[
    int | None,
    Query(ge=0, le=2**64 - 1, description="Makes sampling reproducible: the same seed and observation give the same action."),
]


class ErrorDetail(BaseModel):
    detail: str


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "No api key sent"},
    403: {"model": ErrorDetail, "description": "Wrong api key"},
}


@dataclass(frozen=True)
class Guard:
    """What a guarded route declares: its answers and security in the docs, which `KeyGate` enforces."""

    responses: dict[int | str, dict[str, Any]]
    openapi_extra: dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """What the HTTP layer bounds: body size, requests queued per policy, the drain after SIGTERM."""

    max_body_bytes: int
    max_queue: int = DEFAULT_MAX_QUEUE
    drain_timeout_s: float = DEFAULT_DRAIN_S


@dataclass(frozen=True)
class SDKOptions:
    cache_dir: Path
    in_background: bool = True  # False: generate on the first request for them


def create_app(
    spec: PolicySpec,
    executor: Executor,
    *,
    api_key: str | None,
    limits: Limits,
    metrics: Metrics | None = None,
    sdks: SDKOptions | None = None,
) -> FastAPI:
    """The whole HTTP surface of one policy. `api_key=None` serves without auth (logged);
    `metrics=None` serves no /metrics and counts nothing; `sdks=None` serves no /clients."""
    started = time.time()
    client_sdks: list[ClientSDKs] = []  # made in the lifespan, once the spec has every route
    if api_key is not None:
        register_secret(api_key)
    admission = Admission(executor, limits.max_queue, metrics.count_shed if metrics is not None else None)
    drain = Drain(limits.drain_timeout_s)

    async def start_executor() -> None:
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
        if metrics is not None:
            metrics.describe_model(info)
            metrics.watch_queue(admission)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if api_key is None:
            logger.warning("auth is OFF (POLICY_SERVER_AUTH=off): anyone who reaches this port can call the policy")
        starting = asyncio.create_task(start_executor())
        if executor.starts_in_background:  # the port opens now: /health answers, /ready is 503 until started
            starting.add_done_callback(_shut_down_if_failed)
        else:
            await starting
        if metrics is not None:
            metrics.warn_if_counts_split()
        if sdks is not None:
            client_sdks.append(ClientSDKs(app.openapi(), spec.name, sdks.cache_dir))
            if sdks.in_background:
                await client_sdks[0].start()
        # Start-up made millions of long-lived objects (torch, the model, FastAPI): out of the
        # collector's sight, a /predict_batch that allocates thousands no longer makes it rescan
        # them all (-30 % time per 1,024-observation request, measured in-process).
        gc.freeze()
        drain.install()
        yield
        drain.uninstall()
        for generator in client_sdks:
            await generator.stop()
        await asyncio.wait([starting])  # a start in the background ends before the executor stops
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
    app.router.route_class = OrjsonRoute
    add_offline_docs(app)
    if api_key is not None:
        auth = Guard(AUTH_ERRORS, {"security": SECURITY_REQUIREMENT})
        _document_security_schemes(app)
    else:
        auth = Guard({}, {})
    count_actions = metrics.count_actions if metrics is not None else _count_nothing
    raw_width = executor.describe().get("input_size")  # local: the model's, known before start; ray: the schema's
    fast_routes = _add_raw_route(app, spec, raw_width, admission, auth, count_actions)
    if spec.observations is not None:
        fast_routes |= _add_observation_routes(app, spec, admission, auth, count_actions)
    _add_service_routes(app, spec, executor, admission, drain, auth, api_key is not None, started)
    if sdks is not None:
        _add_client_routes(app, spec, auth, client_sdks)
    _add_error_handlers(app)
    # Middleware, innermost first: each sees what the ones added after it let through.
    app.add_middleware(FastLane, routes=fast_routes, error_response=policy_error_response)
    app.add_middleware(RequestBodyGuard, max_bytes=limits.max_body_bytes)
    if api_key is not None:  # before the body is read: no key, no parsing
        app.add_middleware(KeyGate, api_key=api_key, guarded=guarded_routes(app.routes))
    if metrics is not None:
        _add_metrics_route(app, metrics)
        app.add_middleware(RequestMetrics, metrics=metrics, routes=frozenset(route.path for route in app.routes))
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(CanonicalPath, prefix=spec.url_path)  # outermost: everything inside sees canonical paths
    return app


def _document_security_schemes(app: FastAPI) -> None:
    """Add the api key's schemes to the spec (the routes name them in their `security`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generate().setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _count_nothing(actions: Sequence[Sequence[Any]]) -> None:
    pass


def _shut_down_if_failed(starting: "asyncio.Task[None]") -> None:
    """A start in the background failed: log why and stop the server, as a failed start-up would."""
    if starting.cancelled() or starting.exception() is None:
        return
    error = starting.exception()
    if isinstance(error, ConfigError):  # the user's mistake: the one line, no traceback
        logger.error("policy-server: cannot start: %s", error)
    else:
        logger.error("policy-server: cannot start: %s", error, exc_info=error)
    signal.raise_signal(signal.SIGTERM)  # uvicorn shuts down gracefully: the executor releases what it started


def _add_metrics_route(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)


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


CountActions = Callable[[Sequence[Sequence[Any]]], None]


def _add_observation_routes(
    app: FastAPI, spec: PolicySpec, executor: Admission, auth: Guard, count_actions: CountActions
) -> dict[str, FastRoute]:
    """The routes taking observations; each also as a FastRoute, answered by the same function."""
    Observation = observation_model(spec)
    Decision = decision_model(spec)
    ObservationBatch = batch_model(Observation)
    encoder = RowEncoder(spec)
    example = example_observation(spec)
    fast_routes = {}

    def observation_route(path: str, kind: Kind, response_model: type[BaseModel], summary: str) -> None:
        async def answer(observation: dict[str, Any], seed: int | None) -> Response:
            result = await executor.run(Task(encoder.encode([observation]), kind, seed))
            if isinstance(result, Decisions):
                count_actions(result.actions)
                return json_response(_decision(result, 0))
            return json_response({"heads": result.rows[0]})

        async def endpoint(observation: Observation, seed: Seed = None) -> Response:  # type: ignore[valid-type]
            return await answer(observation, seed)

        app.post(
            path,
            operation_id=path.strip("/"),
            summary=summary,
            response_model=response_model,
            responses=auth.responses,
            tags=["policy"],
            openapi_extra=auth.openapi_extra | {"requestBody": {"content": {"application/json": {"example": example}}}},
        )(endpoint)
        fast_routes[path] = FastRoute(TypeAdapter(Observation).validate_json, answer)

    observation_route("/predict", Kind.SAMPLE, Decision, "Sample an action from the policy")
    observation_route("/predict_deterministic", Kind.DETERMINISTIC, Decision, "The most likely action (continuous: the mean)")
    observation_route("/distribution", Kind.DISTRIBUTION, Distribution, "Every head's probabilities (continuous: mean and std)")

    async def answer_batch(batch: Any, seed: int | None, deterministic: bool = False) -> Response:
        observations = batch.observations
        if not observations:
            return json_response({"results": []})
        kind = Kind.DETERMINISTIC if deterministic else Kind.SAMPLE
        decisions = await executor.run(Task(encoder.encode(observations), kind, seed))
        assert isinstance(decisions, Decisions)
        count_actions(decisions.actions)
        return json_response({"results": [_decision(decisions, row) for row in range(len(observations))]})

    @app.post(
        "/predict_batch",
        operation_id="predict_batch",
        summary="Actions for many observations in one call, answered in order",
        response_model=batch_decisions_model(Decision),
        responses=auth.responses,
        tags=["policy"],
        openapi_extra=auth.openapi_extra
        | {"requestBody": {"content": {"application/json": {"example": {"observations": [example, example]}}}}},
    )
    async def predict_batch(
        batch: ObservationBatch,  # type: ignore[valid-type]
        seed: Seed = None,
        deterministic: Annotated[bool, Query(description="The most likely actions instead of samples.")] = False,
    ) -> Response:
        return await answer_batch(batch, seed, deterministic)

    fast_routes["/predict_batch"] = FastRoute(ObservationBatch.model_validate_json, answer_batch)
    return fast_routes


def _add_raw_route(
    app: FastAPI, spec: PolicySpec, input_size: int | None, executor: Admission, auth: Guard, count_actions: CountActions
) -> dict[str, FastRoute]:
    RawBody = raw_observation_model(spec, input_size)

    async def answer(body: RawObservation, seed: int | None) -> Response:
        decisions = await executor.run(Task(raw_rows(body), Kind.SAMPLE, seed))
        assert isinstance(decisions, Decisions)
        count_actions(decisions.actions)
        return json_response(_decision(decisions, 0))

    @app.post(
        "/predict_raw",
        operation_id="predict_raw",
        summary="Sample an action for a raw input vector",
        response_model=decision_model(spec),
        responses=auth.responses,
        openapi_extra=auth.openapi_extra,
        tags=["policy"],
    )
    async def predict_raw(body: RawBody, seed: Seed = None) -> Response:  # type: ignore[valid-type]
        return await answer(body, seed)

    return {"/predict_raw": FastRoute(RawBody.model_validate_json, answer)}


def _add_service_routes(
    app: FastAPI, spec: PolicySpec, executor: Executor, admission: Admission, drain: Drain, auth: Guard, auth_on: bool, started: float
) -> None:
    @app.get(
        "/schema",
        operation_id="schema",
        summary="The schema, without the api key",
        responses=auth.responses,
        openapi_extra=auth.openapi_extra,
        tags=["service"],
    )
    async def schema() -> Response:
        policy = executor.describe() if executor.ready else {}
        return json_response(spec.public_dict() | {"input_size": policy.get("input_size", spec.input_size), "actions": policy.get("heads")})

    @app.get(
        "/info",
        operation_id="info",
        summary="What is served, and where",
        responses=auth.responses,
        openapi_extra=auth.openapi_extra,
        tags=["service"],
    )
    async def info() -> Response:
        policy = executor.describe() if executor.ready else {"backend": executor.backend}
        details = {"name": spec.name, "version": __version__, "auth": "on" if auth_on else "off", "ready": executor.ready}
        queue = {"max_queue": admission.limit, "queued": admission.admitted, "shed": admission.shed, "draining": drain.draining}
        return json_response(policy | details | queue | {"uptime_seconds": round(time.time() - started, 3)})

    @app.get("/health", operation_id="health", summary="Liveness", tags=["service"])
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready", operation_id="ready", summary="200 once the policy answers, 503 before and while shutting down", tags=["service"])
    async def ready() -> Response:
        if drain.draining:
            return json_response({"detail": "The server is shutting down: send to another replica."}, status_code=503)
        if executor.ready:
            return json_response({"status": "ready"})
        return json_response({"detail": "The policy is still loading; retry shortly."}, status_code=503)

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> Response:
        """Browsers go to the docs; monitors get the original server's answer, 200 and the JSON string "ok"."""
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/docs")
        return json_response("ok")


def _add_client_routes(app: FastAPI, spec: PolicySpec, auth: Guard, client_sdks: list[ClientSDKs]) -> None:
    async def archive(language: str | None) -> Response:
        if not client_sdks:
            return json_response({"detail": "The server is still starting; retry shortly."}, status_code=503)
        await client_sdks[0].start()  # at once if already started or generated
        try:
            path = client_sdks[0].archive(language)
        except UnknownLanguage as exc:
            return json_response({"detail": str(exc)}, status_code=404)
        except SDKsNotReady as exc:
            return json_response({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})
        except ClientSDKError as exc:  # no Java, or the generator failed (logged): the server is fine
            return json_response({"detail": str(exc)}, status_code=503)
        return FileResponse(path, media_type="application/zip", filename=f"{spec.name}-{language or 'clients'}.zip")

    zip_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/zip": {}}, "description": "A zip of the SDKs"},
        404: {"model": ErrorDetail, "description": "No SDK for that language; the detail lists the languages"},
        503: {"model": ErrorDetail, "description": "Being generated (see Retry-After), or no Java runtime to generate with"},
    }

    @app.get(
        "/clients",
        operation_id="clients",
        summary=f"SDKs for {', '.join(LANGUAGES)}, one zip",
        tags=["service"],
        response_class=Response,
        responses=auth.responses | zip_responses,
        openapi_extra=auth.openapi_extra,
    )
    async def all_clients() -> Response:
        return await archive(None)

    @app.get(
        "/clients/{language}",
        operation_id="client",
        summary="The SDK for one language, a zip",
        tags=["service"],
        response_class=Response,
        responses=auth.responses | zip_responses,
        openapi_extra=auth.openapi_extra,
    )
    async def one_client(language: str) -> Response:
        return await archive(language)


def policy_error_response(exc: InputError | PolicyFailure | Overloaded) -> Response:
    """422 for an input the policy cannot answer (an all-masked head), 503 when the queue is full,
    500 for a policy failure."""
    if isinstance(exc, InputError):
        return json_response({"detail": exc.as_detail()}, status_code=422)
    if isinstance(exc, Overloaded):
        return json_response({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})
    return json_response(
        {"detail": f"The policy failed on this request; the server log has the details under error id {exc.error_id}."},
        status_code=500,
    )


def _add_error_handlers(app: FastAPI) -> None:
    async def policy_error(request: Request, exc: InputError | PolicyFailure | Overloaded) -> Response:
        return policy_error_response(exc)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        path = redact(request.url.path)  # a client may have put the key in the path
        if exc.status_code == 404:
            detail = f"No route {request.method} {path}: the routes are listed at /docs."
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {path}: see /docs for the method to use."
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
    app.add_exception_handler(InputError, policy_error)  # type: ignore[arg-type]
    app.add_exception_handler(PolicyFailure, policy_error)  # type: ignore[arg-type]
    app.add_exception_handler(Overloaded, policy_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
