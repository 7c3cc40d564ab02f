"""The operator's routes: activate a version (the rollback), reload a policy from disk now.

Guarded by the operator key (POLICY_SERVER_ADMIN_KEY), never by a policy's key; without one
configured they answer 403 saying how to enable them.
"""

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from policy_server.http.context import ServerContext
from policy_server.http.errors import ErrorDetail, detail_response
from policy_server.http.keys import NO_ADMIN_KEY, KeyCheck
from policy_server.http.routes import GuardedRoute
from policy_server.http.service import describe_policy
from policy_server.json_io import json_response
from policy_server.lifecycle import UnknownVersion, VersionRejected

ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "No operator key sent"},
    403: {"model": ErrorDetail, "description": "Wrong operator key, or no POLICY_SERVER_ADMIN_KEY configured"},
    404: {"model": ErrorDetail, "description": "No such policy or version"},
    409: {"model": ErrorDetail, "description": "The version cannot be loaded: the detail says why; the active one serves on"},
}


class Activation(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    version: str = Field(pattern=r"^[0-9]{1,9}$", description="The number of a folder in the policy's models/.", examples=["2"])


def admin_router(server: ServerContext) -> APIRouter:
    router = APIRouter(
        prefix="/policies/{name}",
        tags=["operator"],
        route_class=GuardedRoute,
        dependencies=[Depends(KeyCheck(server.admin_key, closed_detail=NO_ADMIN_KEY))],
        responses=ADMIN_ERRORS,
    )
    registry = server.registry

    @router.put("/active", operation_id="activate_version", summary="Serve this version from now on (the rollback): 200 once it answers")
    async def activate(name: str, activation: Activation) -> Response:
        if name not in registry.policies:
            return detail_response(404, f"No policy {name!r} is served: GET /policies lists them.")
        version = str(int(activation.version))
        try:
            await registry.activate(name, version)
        except UnknownVersion as exc:
            return detail_response(404, str(exc))
        except VersionRejected as exc:
            return detail_response(409, f"Version {version} cannot be served, the active one serves on: {exc}")
        served = registry.policies[name]
        return json_response(describe_policy(served, name == registry.default_name))

    @router.post("/reload", operation_id="reload_policy", summary="Read the policy's folder now and serve what changed")
    async def reload(name: str) -> Response:
        await registry.sync(settle=True)
        served = registry.policies.get(name)
        if served is None:
            failure = registry.unservable.get(name)
            if failure is not None:
                return detail_response(409, f"Policy {name!r} cannot be served: {failure.reason}")
            return detail_response(404, f"No policy {name!r} in the repository: GET /policies lists them.")
        return json_response(describe_policy(served, name == registry.default_name))

    return router
