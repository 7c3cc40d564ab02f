"""The app's one route table, kept in step with the registry: policies' routes come, change, go.

Each policy's routers (policy_routes.py) are built when it is first served and again when its
schema changes, then put into the app's route list in one assignment: a request already routed
finishes on the route it matched, every later one sees the new table. The default policy's
routes come first (they are the hot ones), then the server's own, then every `/policies/{name}`.
"""

from fastapi import FastAPI
from starlette.routing import BaseRoute

from policy_server.http.context import ServerContext
from policy_server.http.experience_routes import Decider
from policy_server.http.keys import KeyCheck
from policy_server.http.oip_routes import model_routes, unknown_model_routes
from policy_server.http.policy_routes import Placement, policy_routers
from policy_server.http.sdk_routes import OpenAPI, PolicySDKs, add_sdk_routes
from policy_server.lifecycle import ServedPolicy
from policy_server.oip.models import OipModel, OipModels

POLICIES_PREFIX = "/policies/"


class AppRouteTable:
    """The `RouteTable` the registry updates: the app's routes, per policy and at the root."""

    def __init__(self, app: FastAPI, server: ServerContext, fallback_key: str | None) -> None:
        self.app = app
        self.server = server
        self.fallback_key = fallback_key  # POLICY_SERVER_API_KEY (see key_of)
        self.fixed = list(app.router.routes)  # docs, openapi, service and operator routes
        self.root: list[BaseRoute] = []
        self.by_policy: dict[str, list[BaseRoute]] = {}
        self.sdks: dict[str, PolicySDKs] = {}  # "" : the root's
        self.oip = OipModels()  # what the OIP routes (REST here, gRPC) serve
        self.oip_tail = unknown_model_routes(self.oip)

    def install(self, served: ServedPolicy) -> None:
        key = self.key_of(served)
        model = OipModel(Decider(served, self.server.experience.for_policy(served.spec)), None if key is None else KeyCheck(key))
        self.oip.put(model)
        self.by_policy[served.name] = [*self._routes(served, key, Placement.under_policies(served.name)), *model_routes(model)]
        if served.name == self.server.registry.default_name:
            self.root = self._routes(served, key, Placement.root())
        self._publish()

    def remove(self, name: str) -> None:
        self.by_policy.pop(name, None)
        self.oip.remove(name)
        if name == self.server.registry.default_name:
            self.root = []
        self._publish()

    def key_of(self, served: ServedPolicy) -> str | None:
        """The policy's key. POLICY_SERVER_API_KEY overrides the schema's for one policy (as in
        wave 1); in a repository it is the key of the policies whose schema names none."""
        if not self.server.auth_on:
            return None
        if self.server.registry.single:
            return self.fallback_key or served.spec.api_key
        return served.spec.api_key or self.fallback_key

    def _routes(self, served: ServedPolicy, key: str | None, place: Placement) -> list[BaseRoute]:
        routers = policy_routers(served, key, place, self.server)
        if self.server.sdks is not None:
            sdks = self.sdks.get(place.prefix) or PolicySDKs(served.name, self.server.sdks.cache_dir, self._openapi_of(place.prefix))
            self.sdks[place.prefix] = sdks
            add_sdk_routes(routers[-1], sdks, place.operation_prefix)
        return [route for router in routers for route in router.routes]

    def _publish(self) -> None:
        policies = (route for routes in self.by_policy.values() for route in routes)
        routes = [*self.root, *self.fixed, *policies, *self.oip_tail]
        self.app.router.routes = routes
        self.app.openapi_schema = None  # made again from the new table on the next /openapi.json

    def _openapi_of(self, prefix: str) -> "OpenAPIOf":
        return OpenAPIOf(self.app, prefix)


class OpenAPIOf:
    """The part of the app's OpenAPI a policy's SDKs are made from: its own paths (under
    `prefix`), or for the root every path outside /policies/ (as the one-policy server had)."""

    def __init__(self, app: FastAPI, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    def __call__(self) -> OpenAPI:
        spec = self.app.openapi()
        if self.prefix:
            paths = {path: item for path, item in spec["paths"].items() if path.startswith(self.prefix + "/")}
        else:
            paths = {path: item for path, item in spec["paths"].items() if not path.startswith(POLICIES_PREFIX)}
        return spec | {"paths": paths}
