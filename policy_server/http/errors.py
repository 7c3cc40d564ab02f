"""Every `{"detail": ...}` answer the server gives (and the OIP routes' `{"error": ...}`), built
here: the one place errors become answers.

Route handlers and the policy raise (`InputError`, `PolicyFailure`, `Overloaded`, FastAPI's
validation and HTTP errors); the handlers installed by `install_error_handlers` answer them, and
the fast path (routes.py) and the pure ASGI middleware answer with the same functions.
"""

import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Send

from policy_server.admission import Overloaded
from policy_server.errors import InputError, PolicyFailure
from policy_server.experience.errors import EpisodeError, ExperienceUnavailable
from policy_server.json_io import json_response
from policy_server.oip.errors import OipError
from policy_server.recurrent.errors import RecurrentError
from policy_server.redaction import redact

logger = logging.getLogger("policy_server")


class ErrorDetail(BaseModel):
    detail: str


def detail_response(status_code: int, detail: Any, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"detail": detail}, status_code=status_code, headers=dict(headers) if headers else None)


PolicyError = InputError | PolicyFailure | Overloaded | EpisodeError | ExperienceUnavailable | RecurrentError
POLICY_ERRORS = (InputError, PolicyFailure, Overloaded, EpisodeError, ExperienceUnavailable, RecurrentError)


def policy_error_response(exc: PolicyError) -> Response:
    """422 for an input the policy cannot answer (an all-masked head), 503 when the queue is full
    or the experience log cannot keep up, 404/409 for an outcome of no (or an ended) episode, 422/409
    for a recurrent policy's step of no episode (or of one whose memory is gone), 500 for a policy failure."""
    if isinstance(exc, InputError):
        return detail_response(422, exc.as_detail())
    if isinstance(exc, Overloaded | ExperienceUnavailable):
        return detail_response(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, EpisodeError | RecurrentError):
        return detail_response(exc.status, str(exc))
    return detail_response(500, f"The policy failed on this request; the server log has the details under error id {exc.error_id}.")


def oip_error_response(exc: OipError) -> Response:
    """The Open Inference Protocol's error form, `{"error": message}`, for its REST routes."""
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return json_response({"error": exc.message}, status_code=exc.status, headers=headers)


async def send_error(send: Send, status: int, detail: Any, headers: Mapping[str, str] | None = None) -> None:
    """Answer `{"detail": detail}` from pure ASGI code, before any route ran."""
    body = json.dumps({"detail": detail}).encode()
    extra = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    for policy_error in POLICY_ERRORS:
        app.add_exception_handler(policy_error, _policy_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


async def _policy_error(request: Request, exc: PolicyError) -> Response:
    return policy_error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail
    path = redact(request.url.path)  # a client may have put the key in the path
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"No route {request.method} {path}: the routes are listed at /docs, the policies at /policies."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {path}: see /docs for the method to use."
    return json_response({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    # FastAPI's own handler echoes each bad input, which fails on NaN and can be huge.
    errors = [{key: error[key] for key in ("loc", "msg", "type") if key in error} for error in exc.errors()]
    return detail_response(422, jsonable_encoder(errors))


async def _unexpected(request: Request, exc: Exception) -> Response:
    error_id = uuid.uuid4().hex[:12]
    logger.error("unexpected error on %s %s (error id %s)", request.method, request.url.path, error_id, exc_info=exc)
    return detail_response(500, f"Internal error; the server log holds the traceback under error id {error_id}.")
