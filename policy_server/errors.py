"""Errors a user can fix, told in one line.

A bad schema or model file is the user's mistake, not ours: it must stop start-up with one line
that names the file, the key and the fix, never a traceback.
"""

import re
from pathlib import Path


class ConfigError(Exception):
    """A policy directory that cannot be served as it is."""

    def __init__(self, path: Path | str, key: str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {key}: {problem}; fix: {fix}")


class InputError(Exception):
    """A request the policy cannot answer as sent: answered 422 in FastAPI's error format."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, kind: str) -> None:
        self.loc = loc
        self.msg = msg
        self.kind = kind
        super().__init__(msg)

    def as_detail(self) -> list[dict[str, object]]:
        return [{"loc": list(self.loc), "msg": self.msg, "type": self.kind}]


class PolicyFailure(Exception):
    """The model itself failed; the traceback is in the log under `error_id`."""

    def __init__(self, error_id: str) -> None:
        self.error_id = error_id
        super().__init__(f"the policy failed; see the server log for error id {error_id}")


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type when it says nothing): what a one-line error quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


def model_error_line(exc: BaseException) -> str:
    """What a model's exception says went wrong, in one line. TorchScript's interpreter puts its
    own traceback first and the original error (`RuntimeError: ...`) after it: quote that."""
    lines = str(exc).strip().splitlines()
    return next((line for line in lines[1:] if _ERROR_LINE.match(line)), first_line(exc))
