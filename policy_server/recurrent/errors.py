"""Why a recurrent policy's step cannot be taken: answered by http/errors.py."""


class RecurrentError(Exception):
    """A step the episode store refuses: 422 (no episode named, an agent twice in one batch) or
    409 (its memory is gone, its version retired, a step of it already in flight)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        super().__init__(detail)
