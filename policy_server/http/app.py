"""The FastAPI app: its routers, its middleware in order, its lifespan.

A request, from the socket in: `CanonicalPath` (trailing slashes, `url_path`), `DrainMiddleware`
(Connection: close while shutting down), `RequestMetrics`, then FastAPI's router over the one
route table (table.py): the matched route checks the key and the body's type and size
(routes.py), validates the body and calls its endpoint (policy_routes.py), which hands a `Task`
to the policy's admission and executor. Errors become answers in errors.py.
"""

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace

from policy_server import __version__
from policy_server.docs import add_offline_docs
from policy_server.drain import Drain, DrainMiddleware
from policy_server.errors import ConfigError
from policy_server.experience.logs import ExperienceLogs
from policy_server.experience.metrics import ExperienceCollector
from policy_server.http.admin import admin_router
from policy_server.http.context import Limits, SDKOptions, ServerContext
from policy_server.http.errors import install_error_handlers
from policy_server.http.middleware import BodyGuard, CanonicalPath
from policy_server.http.oip_routes import server_routes
from policy_server.http.service import metrics_router, service_router
from policy_server.http.table import AppRouteTable
from policy_server.json_io import OrjsonRoute
from policy_server.lifecycle import Registry
from policy_server.metrics import Metrics, RequestMetrics
from policy_server.oip.grpc.options import GrpcOptions
from policy_server.redaction import register_secret

if TYPE_CHECKING:
    from policy_server.oip.grpc.server import GrpcServer

logger = logging.getLogger("policy_server")

__all__ = ["Limits", "SDKOptions", "create_app"]


def create_app(
    registry: Registry,
    *,
    auth_on: bool,
    limits: Limits,
    api_key: str | None = None,
    admin_key: str | None = None,
    metrics: Metrics | None = None,
    sdks: SDKOptions | None = None,
    watch_every_s: float | None = None,
    experience: ExperienceLogs | None = None,
    grpc: GrpcOptions | None = None,
) -> FastAPI:
    """The whole HTTP surface of the registry's policies (loaded already, started in the lifespan).

    `auth_on=False` serves without keys (logged); `api_key` is the key of policies whose schema
    names none; `admin_key=None` closes the operator routes; `metrics=None` serves no /metrics;
    `sdks=None` serves no /clients; `watch_every_s=None` does not watch the repository;
    `experience` logs what schemas ask for (by default) or every policy (with an override dir);
    `grpc` serves OIP over gRPC too (None: not)."""
    for secret in (api_key, admin_key, *(served.spec.api_key for served in registry.policies.values())):
        if secret:
            register_secret(secret)
    server = ServerContext(registry, Drain(limits.drain_timeout_s), auth_on, sdks, admin_key, experience or ExperienceLogs())
    default = registry.default
    title = f"{default.name} policy" if default is not None else "Policy server"
    app = FastAPI(
        title=title,
        version=__version__,
        description=_description(registry, auth_on),
        lifespan=_lifespan(server, metrics, watch_every_s, grpc),
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        telemetry=_telemetry(),
    )
    app.router.route_class = OrjsonRoute
    app.state.body_guard = BodyGuard(limits.max_body_bytes)
    add_offline_docs(app)
    app.include_router(service_router(server))
    app.include_router(admin_router(server))
    app.router.routes.extend(server_routes(lambda: _serving(server)))
    if metrics is not None:
        app.include_router(metrics_router(metrics))
        metrics.add_collector(ExperienceCollector(server.experience))
    app.state.routes = table = AppRouteTable(app, server, api_key)
    registry.attach(table)
    install_error_handlers(app)
    # Middleware, innermost first: each sees what the ones added after it let through.
    if metrics is not None:
        app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(DrainMiddleware, drain=server.drain)
    prefix = default.spec.url_path if default is not None else None
    app.add_middleware(CanonicalPath, prefix=prefix)  # outermost: everything inside sees canonical paths
    return app


def _telemetry() -> TelemetryConfig | None:
    """FastAPI's OpenTelemetry spans and metrics when a tracer provider is set before the app is
    built (opentelemetry-instrument, or the user's own setup); else off, since checking for
    providers on every request costs a measurable share of a one-row /predict."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    return {"tracing": False, "metrics": False, "logs": False}


def _serving(server: ServerContext) -> bool:
    """What OIP's server readiness says, on REST and gRPC: started, and not draining."""
    return server.registry.ready and not server.drain.draining


def _lifespan(server: ServerContext, metrics: Metrics | None, watch_every_s: float | None, grpc: GrpcOptions | None):  # type: ignore[no-untyped-def]
    registry = server.registry

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        table: AppRouteTable = app.state.routes
        if not server.auth_on:
            logger.warning("auth is OFF (POLICY_SERVER_AUTH=off): anyone who reaches this port can call the policies")
        starting = asyncio.create_task(_start(registry))
        if any(served.executor.starts_in_background for served in registry.policies.values()):
            starting.add_done_callback(_shut_down_if_failed)  # the port opens now: /ready is 503 until started
        else:
            await starting
        if metrics is not None:
            metrics.warn_if_counts_split()
        if server.sdks is not None and server.sdks.in_background and "" in table.sdks:
            await table.sdks[""].start()
        if watch_every_s is not None:
            registry.watch(watch_every_s)
        grpc_server = await _start_grpc(grpc, table, server) if grpc is not None else None
        # Start-up made millions of long-lived objects (torch, the model, FastAPI): out of the
        # collector's sight, a /predict_batch that allocates thousands no longer makes it rescan
        # them all (-30 % time per 1,024-observation request, measured in-process).
        gc.freeze()
        server.drain.install()
        yield
        server.drain.uninstall()
        if grpc_server is not None:
            await grpc_server.stop()  # before the executors its calls reach
        for sdks in table.sdks.values():
            await sdks.stop()
        await asyncio.wait([starting])  # a start in the background ends before the executors stop
        await registry.stop()
        await asyncio.to_thread(server.experience.close)  # every step accepted goes to disk

    return lifespan


async def _start(registry: Registry) -> None:
    await registry.start()
    for served in registry.policies.values():
        info = served.executor.describe()
        logger.info(
            "Finished loading %s version %s: %s (%s) with backend %s, %s replica(s), on %s",
            served.name,
            served.active,
            info.get("model"),
            info.get("format"),
            served.executor.backend,
            info.get("replicas"),
            info.get("device"),
        )


async def _start_grpc(options: GrpcOptions, table: AppRouteTable, server: ServerContext) -> "GrpcServer":
    """OIP over gRPC on the route table's models, in this event loop; it drains with the HTTP side."""
    from policy_server.oip.grpc.server import GrpcServer, uvicorn_host  # grpc is imported only when served
    from policy_server.oip.grpc.service import InferenceService

    grpc_server = GrpcServer(options, InferenceService(table.oip, lambda: _serving(server), server.drain), server.drain.timeout_s)
    await grpc_server.start(uvicorn_host())  # before the drain replaces uvicorn's SIGTERM handler
    server.drain.on_start.append(grpc_server.begin_drain)
    return grpc_server


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


def _description(registry: Registry, auth_on: bool) -> str:
    default = registry.default
    lines = []
    if default is not None:
        spec = default.spec
        kind = f"{'discrete' if spec.discrete else 'continuous'} actions{', several heads' if spec.is_tuple else ''}"
        lines.append(f"Decisions of the **{spec.name}** policy ({kind}) at the root routes.")
    names = ", ".join(f"`{name}`" for name in registry.policies)
    lines.append(f"Every policy is served under `/policies/{{name}}/...` ({names}); `GET /policies` lists them and their versions.")
    if auth_on:
        lines.append("Send the policy's api key in the header `access-token: KEY` or `Authorization: Bearer KEY`.")
    if default is not None and default.spec.url_path:
        lines.append(f"Every route is also served under `{default.spec.url_path}`, and with a trailing slash.")
    else:
        lines.append("Every route is also served with a trailing slash.")
    return "\n\n".join(lines)
