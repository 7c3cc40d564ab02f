"""The api key check: a FastAPI dependency, header only, compared in constant time.

Accepted as `access-token: KEY` (the original server's header) or `Authorization: Bearer KEY`.
Never as a query parameter: URLs end up in logs. The key is kept as bytes in this closure and is
never put in a response, an error or a log line.
"""

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import HTTPException, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

ACCESS_TOKEN_HEADER = "access-token"
MISSING_KEY = f"Missing api key: send the header '{ACCESS_TOKEN_HEADER}: KEY' or 'Authorization: Bearer KEY'."
WRONG_KEY = "Wrong api key: check the value of the key you send."

_access_token = APIKeyHeader(name=ACCESS_TOKEN_HEADER, auto_error=False, description="The policy's api key (the original server's header).")
_bearer = HTTPBearer(auto_error=False, description="The policy's api key as a bearer token.")


def api_key_dependency(api_key: str) -> Callable[..., Awaitable[None]]:
    """A dependency that lets a request through only with the right key: 401 missing, 403 wrong."""
    expected = api_key.encode("utf-8")

    async def require_api_key(
        token: Annotated[str | None, Security(_access_token)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        given = token if token is not None else (bearer.credentials if bearer is not None else None)
        if given is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING_KEY, headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode("utf-8"), expected):
            raise HTTPException(status.HTTP_403_FORBIDDEN, WRONG_KEY)

    return require_api_key
