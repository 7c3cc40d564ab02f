"""Errors become gRPC answers here, in one place: an OipError's HTTP status as a gRPC code, the
policy's own errors as the REST routes answer them, anything else as INTERNAL with an error id
(its traceback in the log). Every message is redacted: a key sent where it does not belong
(a model name, a sequence id) is not echoed back.
"""

import logging
import uuid
from typing import NoReturn, get_args

import grpc

from policy_server.oip.errors import OipError, PolicyError, from_policy_error
from policy_server.redaction import redact

logger = logging.getLogger("policy_server")

POLICY_ERRORS: tuple[type[Exception], ...] = get_args(PolicyError)
RETRY_AFTER = "retry-after"  # trailing metadata of an UNAVAILABLE that may succeed later, in seconds

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def code_of(status: int) -> grpc.StatusCode:
    return _CODES.get(status, grpc.StatusCode.UNKNOWN)


def oip_error_of(exc: Exception) -> OipError:
    """What `exc`, raised while answering a call, is answered with."""
    if isinstance(exc, OipError):
        return OipError(exc.status, redact(exc.message), exc.retry_after_s)
    if isinstance(exc, POLICY_ERRORS):
        error = from_policy_error(exc)  # type: ignore[arg-type]
        return OipError(error.status, redact(error.message), error.retry_after_s)
    error_id = uuid.uuid4().hex[:12]
    logger.error("unexpected error in a gRPC call (error id %s)", error_id, exc_info=exc)
    return OipError(500, f"Internal error; the server log holds the traceback under error id {error_id}.")


async def abort(context: grpc.aio.ServicerContext, error: OipError) -> NoReturn:
    """End the call with `error`'s code and message (and when to retry, for a 503)."""
    trailing = ((RETRY_AFTER, str(error.retry_after_s)),) if error.retry_after_s is not None else ()
    await context.abort(code_of(error.status), error.message, trailing_metadata=trailing)
    raise AssertionError("unreachable: context.abort raises")
