"""OIP errors: a message and the HTTP status it is answered with (gRPC maps the status to a code)."""

from policy_server.admission import Overloaded
from policy_server.errors import InputError, PolicyFailure
from policy_server.experience.errors import EpisodeError, ExperienceUnavailable
from policy_server.recurrent.errors import RecurrentError

PolicyError = InputError | PolicyFailure | Overloaded | EpisodeError | ExperienceUnavailable | RecurrentError


class OipError(Exception):
    """A request the server answers with `{"error": message}` and `status` (4xx for the caller's
    mistakes); `retry_after_s` when it may succeed later (503)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        super().__init__(message)


def bad_request(message: str) -> OipError:
    return OipError(400, message)


def from_policy_error(exc: PolicyError) -> OipError:
    """What the typed routes answer (errors.py), in OIP's terms: an input the policy cannot
    answer is 400, a full queue or a log behind 503, an episode's 404/409 as they are."""
    if isinstance(exc, InputError):
        where = ".".join(str(part) for part in exc.loc[1:])
        return OipError(400, f"{where}: {exc.msg}" if where else exc.msg)
    if isinstance(exc, Overloaded | ExperienceUnavailable):
        return OipError(503, str(exc), exc.retry_after_s)
    if isinstance(exc, EpisodeError):
        return OipError(exc.status, str(exc))
    if isinstance(exc, RecurrentError):  # a recurrent policy's step: no sequence named is a bad request
        return OipError(400 if exc.status == 422 else exc.status, str(exc))
    return OipError(500, f"The policy failed on this request; the server log has the details under error id {exc.error_id}.")
