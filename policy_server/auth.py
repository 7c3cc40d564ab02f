"""The api key check: a FastAPI dependency, header only, compared in constant time.

Accepted as `access-token: KEY` (the original server's header) or `Authorization: Bearer KEY`.
Never as a query parameter: URLs end up in logs. The key is kept as bytes in this closure and is
never put in a response, an error or a log line.

The dependency reads the two headers itself rather than through FastAPI's `Security(APIKeyHeader)`
and `Security(HTTPBearer)`: those are two more dependencies to solve on every request, ~170 Python
calls of the ~890 the app made per /predict (cProfile, in-process). The OpenAPI spec still
documents both schemes, through `SECURITY_SCHEMES` and `SECURITY_REQUIREMENT`, so /docs and the
SDKs know them.
"""

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, Request, status
from starlette.datastructures import Headers

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


def api_key_dependency(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets a request through only with the right key: 401 missing, 403 wrong."""
    expected = api_key.encode("utf-8")

    async def require_api_key(request: Request) -> None:
        given = key_in(request.headers)
        if given is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING_KEY, headers={"WWW-Authenticate": "Bearer"})
        if not _same_key(given, expected):
            raise HTTPException(status.HTTP_403_FORBIDDEN, WRONG_KEY)

    return require_api_key


def key_accepted(headers: Headers, expected: bytes) -> bool:
    """The request sends the right key (for the fast lane: any failure goes on to the dependency)."""
    given = key_in(headers)
    return given is not None and _same_key(given, expected)


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
