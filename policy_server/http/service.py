"""The server's own routes: liveness, readiness, the root, the list of policies, the metrics."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from policy_server.http.context import ServerContext
from policy_server.http.errors import detail_response
from policy_server.json_io import json_response
from policy_server.lifecycle import ServedPolicy
from policy_server.metrics import Metrics


def service_router(server: ServerContext) -> APIRouter:
    router = APIRouter(tags=["service"])
    registry = server.registry

    @router.get("/health", operation_id="health", summary="Liveness")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @router.get("/ready", operation_id="ready", summary="200 once every policy answers, 503 before and while shutting down")
    async def ready() -> Response:
        if server.drain.draining:
            return detail_response(503, "The server is shutting down: send to another replica.")
        if registry.ready:
            return json_response({"status": "ready"})
        return detail_response(503, "The policy is still loading; retry shortly.")

    @router.get("/policies", operation_id="policies", summary="Every policy: its versions, their states, the active one")
    async def policies() -> Response:
        listed = [describe_policy(served, served.name == registry.default_name) for served in registry.policies.values()]
        unservable = [{"name": name, "error": failure.reason, "versions": []} for name, failure in registry.unservable.items()]
        return json_response({"default": registry.default_name, "policies": listed + unservable})

    @router.get("/", include_in_schema=False)
    async def root(request: Request) -> Response:
        """Browsers go to the docs; monitors get the original server's answer, 200 and the JSON string "ok"."""
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/docs")
        return json_response("ok")

    return router


def describe_policy(served: ServedPolicy, default: bool) -> dict[str, Any]:
    versions = sorted(served.versions.values(), key=lambda status: int(status.version))
    return {
        "name": served.name,
        "default": default,
        "active": served.active,
        "ready": served.executor.ready,
        "backend": served.executor.backend,
        "versions": [
            {
                "version": status.version,
                "state": str(status.state),
                "sha256": status.sha256,
                "loaded_at": status.loaded_at,
                "error": status.error,
            }
            for status in versions
        ],
        "error": served.last_error,
    }


def metrics_router(metrics: Metrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return router
