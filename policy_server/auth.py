"""The api key check: a pure ASGI gate in front of everything else, header only, constant time.

Accepted as `access-token: KEY` (the original server's header) or `Authorization: Bearer KEY`.
Never as a query parameter: URLs end up in logs. The gate answers 401 (no key) or 403 (a wrong
key) before any body is read or parsed, so a client without the key learns nothing about what
its body would have done. The routes it guards are those whose OpenAPI entry declares the
schemes (`SECURITY_REQUIREMENT`): the documented security is the gate's table, so /docs, the
SDKs and the server cannot disagree.
"""

import hmac
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from policy_server.middleware import send_error

ACCESS_TOKEN_HEADER = "access-token"
MISSING_KEY = f"Missing api key: send the header '{ACCESS_TOKEN_HEADER}: KEY' or 'Authorization: Bearer KEY'."
WRONG_KEY = "Wrong api key: check the value of the key you send."

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "APIKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": ACCESS_TOKEN_HEADER,
        "description": "The policy's api key (the original server's header).",
    },
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "The policy's api key as a bearer token."},
}
SECURITY_REQUIREMENT: list[dict[str, list[str]]] = [{name: []} for name in SECURITY_SCHEMES]


class KeyGate:
    """Lets a request to a guarded route through only with the right key: 401 missing, 403 wrong."""

    def __init__(self, app: ASGIApp, api_key: str, guarded: Sequence[BaseRoute]) -> None:
        self.app = app
        self.expected = api_key.encode("utf-8")
        self.exact_paths = frozenset(route.path for route in guarded if isinstance(route, Route) and "{" not in route.path)
        self.path_patterns = tuple(route.path_regex for route in guarded if isinstance(route, Route) and "{" in route.path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._guards(scope["path"]):
            given = key_in(Headers(scope=scope))
            if given is None:
                await send_error(send, 401, MISSING_KEY, {"WWW-Authenticate": "Bearer"})
                return
            if not _same_key(given, self.expected):
                await send_error(send, 403, WRONG_KEY)
                return
        await self.app(scope, receive, send)

    def _guards(self, path: str) -> bool:
        return path in self.exact_paths or any(pattern.match(path) for pattern in self.path_patterns)


def guarded_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """The routes whose OpenAPI entry declares the api key's schemes."""
    return [route for route in routes if isinstance(route, Route) and "security" in (getattr(route, "openapi_extra", None) or {})]


def _same_key(given: str, expected: bytes) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected)


def key_in(headers: Headers) -> str | None:
    """The key a request sends: `access-token` first, else an `Authorization: Bearer` token.
    An empty header is no key (401, not 403)."""
    token = headers.get(ACCESS_TOKEN_HEADER)
    if token:
        return token
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None
