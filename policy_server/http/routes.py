"""The route classes: the key checked before the body, and a fast path for plain predictions.

`GuardedRoute` runs its router's `KeyCheck` on the headers before anything reads the body, then
hands the request to FastAPI's own handler (parsing JSON with orjson, `OrjsonRoute`).

`PredictionRoute` adds the fast path. For a one-observation /predict, FastAPI's dependency
solving and body handling cost more than the policy itself (figures in bench/RESULTS.md), and
validating the body with the route's own pydantic validator costs a fraction of that. So when
everything about a request is plain (a declared Content-Length, a body that validates, and a
query of nothing but the route's own `seed`, `episode_id` and `agent_id`, each once, in plain
characters), the route calls its endpoint itself, with the validated body. Anything else
(a body that fails validation, other query parameters) goes to FastAPI's handler, body included,
so every error is FastAPI's documented answer: one route table, one endpoint per route, errors
mapped in errors.py. A route may also read plain bodies straight into rows (`read_rows_with`:
/predict_batch, where validating a model per observation costs more than the forward pass).
"""

import re
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from policy_server.experience.episodes import is_valid_id
from policy_server.http.errors import POLICY_ERRORS, policy_error_response, send_error
from policy_server.http.keys import KeyCheck, key_in
from policy_server.http.middleware import BodyGuard
from policy_server.json_io import OrjsonRoute

_MAX_SEED = 2**64 - 1
_PLAIN_PARAMETERS = ("seed", "episode_id", "agent_id")  # what the fast path reads itself
_DIGITS = re.compile(r"\d{1,20}")


class GuardedRoute(OrjsonRoute):
    """A route whose router's `KeyCheck` (if any) answers 401/403 before the body is read, and
    whose body the app's `BodyGuard` checks (JSON, size) before anything parses it."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.key_check = next((d.dependency for d in self.dependencies if isinstance(d.dependency, KeyCheck)), None)
        self.fastapi_app = self.app
        self.app = self.serve

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key_check is not None:
            refusal = self.key_check.refusal(key_in(Headers(scope=scope)))
            if refusal is not None:
                status, detail = refusal
                await send_error(send, status, detail, {"WWW-Authenticate": "Bearer"} if status == 401 else None)
                return
        body_guard: BodyGuard = scope["app"].state.body_guard
        guarded_receive = await body_guard.admit(scope, receive, send)
        if guarded_receive is not None:
            await self.answer(scope, guarded_receive, send)

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fastapi_app(scope, receive, send)


RowsReader = Callable[[bytes], np.ndarray | None]  # a body's rows, or None: validate it as usual
RowsAnswer = Callable[..., Awaitable[Response]]  # rows and the plain query's parameters → the endpoint's answer


class PredictionRoute(GuardedRoute):
    """A POST route of one JSON body and an optional `seed`: plain requests skip FastAPI's handler."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        (body,) = self.dependant.body_params
        self.body_name = body.name
        self.validate = TypeAdapter(body.field_info.annotation).validate_json
        self.plain_parameters = frozenset(p.name for p in self.dependant.query_params) & set(_PLAIN_PARAMETERS)
        self.rows_route: tuple[RowsReader, RowsAnswer] | None = None

    def read_rows_with(self, read: RowsReader, answer: RowsAnswer) -> None:
        """Plain bodies that `read` turns into rows are answered by `answer`, as the endpoint would."""
        self.rows_route = read, answer

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = _plain_query(scope["query_string"], self.plain_parameters)
        if query is None or not _declares_length(scope["headers"]):
            await self.fastapi_app(scope, receive, send)  # the body is untouched: FastAPI reads it
            return
        body = await _read_body(receive)
        read_rows, answer_rows = self.rows_route or (None, None)
        rows = read_rows(body) if read_rows is not None else None
        if rows is not None and answer_rows is not None:
            answering = answer_rows(rows, **query)
        else:
            try:
                validated = self.validate(body)
            except ValidationError:
                await self.fastapi_app(scope, _replay(body, receive), send)  # FastAPI's 422, with its details
                return
            answering = self.endpoint(**{self.body_name: validated}, **query)
        try:
            response = await answering
        except POLICY_ERRORS as exc:
            response = policy_error_response(exc)
        await response(scope, receive, send)


def _declares_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)


def _plain_query(query: bytes, names: frozenset[str]) -> dict[str, Any] | None:
    """The query's parameters if each is one of `names`, given once, and plainly valid (a seed
    in range, ids of the allowed characters, nothing to unquote); else None: FastAPI reads it."""
    if not query:
        return {}
    parameters: dict[str, Any] = {}
    for pair in query.decode("latin-1").split("&"):
        name, equals, value = pair.partition("=")
        if not equals or name not in names or name in parameters:
            return None
        if name == "seed":
            if not _DIGITS.fullmatch(value) or int(value) > _MAX_SEED:
                return None
            parameters[name] = int(value)
        elif is_valid_id(value):
            parameters[name] = value
        else:
            return None
    return parameters


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
