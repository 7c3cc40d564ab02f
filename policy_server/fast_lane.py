"""The fast lane: well-formed prediction requests skip FastAPI's per-request machinery.

For a one-observation /predict, FastAPI's routing, dependency solving and body handling cost
more than the policy itself (figures in bench/RESULTS.md); validating the body with the route's
own pydantic validator and reading `seed` directly costs a fraction of that. So this middleware
answers a prediction request itself when everything about it is plain: a declared
Content-Length, a body that validates, and no query other than `?seed=N` (the key was checked by
`KeyGate`, in front). It answers with the very function the FastAPI route calls. Anything else
(a body that fails validation, other query parameters) goes on to FastAPI untouched, body
included, so every error is FastAPI's documented answer and the routes in /docs stay the truth.
"""

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.admission import Overloaded
from policy_server.errors import InputError, PolicyFailure

_PLAIN_SEED = re.compile(rb"seed=(\d{1,20})")
_MAX_SEED = 2**64 - 1
_NOT_PLAIN = -1  # seeds are ≥ 0


@dataclass(frozen=True)
class FastRoute:
    """What a prediction route does with a valid body: `validate` the raw JSON (raises
    ValidationError), then `answer` the validated body for a seed (None: unseeded)."""

    validate: Callable[[bytes], Any]
    answer: Callable[[Any, int | None], Awaitable[Response]]


class FastLane:
    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, FastRoute],
        error_response: Callable[[InputError | PolicyFailure | Overloaded], Response],
    ) -> None:
        self.app = app
        self.routes = routes
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        seed = _plain_seed(scope["query_string"])
        if seed == _NOT_PLAIN or not _declares_length(scope["headers"]):
            await self.app(scope, receive, send)  # the body is untouched: FastAPI reads it
            return
        body = await _read_body(receive)
        try:
            validated = route.validate(body)
        except ValidationError:
            await self.app(scope, _replay(body, receive), send)  # FastAPI's 422, with its details
            return
        try:
            response = await route.answer(validated, seed)
        except (InputError, PolicyFailure, Overloaded) as exc:
            response = self.error_response(exc)
        await response(scope, receive, send)


def _declares_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)


def _plain_seed(query: bytes) -> int | None:
    """None for no query, the seed for exactly `seed=N` in range, _NOT_PLAIN for anything else."""
    if not query:
        return None
    match = _PLAIN_SEED.fullmatch(query)
    if match is None or int(match.group(1)) > _MAX_SEED:
        return _NOT_PLAIN
    return int(match.group(1))


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once more, then the connection's own messages (a disconnect, say)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
