"""Api keys: each policy's key opens that policy's routes only; the operator key, the routes that
change what is served.

A key is sent as `access-token: KEY` (the original server's header) or `Authorization: Bearer
KEY`; never as a query parameter (URLs end up in logs). A `KeyCheck` is a FastAPI dependency set
once on a router, so /docs, the SDKs and the server cannot disagree on which routes need which
key. `GuardedRoute` (routes.py) also runs it before the body is read: a client without the key
gets 401 (none sent) or 403 (a wrong one) and learns nothing of what its body would have done.
"""

import hmac
from typing import Annotated

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

ACCESS_TOKEN_HEADER = "access-token"
MISSING_KEY = f"Missing api key: send the header '{ACCESS_TOKEN_HEADER}: KEY' or 'Authorization: Bearer KEY'."
WRONG_KEY = "Wrong api key: check the value of the key you send."
NO_ADMIN_KEY = "The operator routes are off: set POLICY_SERVER_ADMIN_KEY on the server to enable them, then send that key."

_ACCESS_TOKEN = APIKeyHeader(
    name=ACCESS_TOKEN_HEADER, scheme_name="APIKeyHeader", description="The api key (the original server's header).", auto_error=False
)
_BEARER = HTTPBearer(scheme_name="HTTPBearer", description="The api key as a bearer token.", auto_error=False)


class KeyCheck:
    """Lets a request through only with `key`: 401 missing, 403 wrong. `key=None`: no key opens it (403)."""

    def __init__(self, key: str | None, closed_detail: str = WRONG_KEY) -> None:
        self.expected = key.encode("utf-8") if key is not None else None
        self.closed_detail = closed_detail

    async def __call__(
        self,
        access_token: Annotated[str | None, Security(_ACCESS_TOKEN)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    ) -> None:
        refusal = self.refusal(access_token or (bearer.credentials.strip() if bearer is not None else None) or None)
        if refusal is not None:
            status, detail = refusal
            raise HTTPException(status, detail, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    def refusal(self, given: str | None) -> tuple[int, str] | None:
        """(status, detail) when `given` does not open the route, else None."""
        if self.expected is None:
            return 403, self.closed_detail
        if given is None:
            return 401, MISSING_KEY
        if not hmac.compare_digest(given.encode("utf-8"), self.expected):
            return 403, self.closed_detail
        return None


def key_in(headers: Headers) -> str | None:
    """The key a request sends: `access-token` first, else an `Authorization: Bearer` token.
    An empty header is no key (401, not 403)."""
    token = headers.get(ACCESS_TOKEN_HEADER)
    if token:
        return token
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None
