"""Why the log refuses a request: answered by http/errors.py."""


class EpisodeError(Exception):
    """An outcome the log cannot take as sent: 404 (no such episode) or 409 (not now)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        super().__init__(detail)


class ExperienceUnavailable(Exception):
    """The log cannot take more now (the disk fails, or it is behind): answered 503 with Retry-After."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"{detail}; requests that name an episode are refused until it recovers (those without one are served): "
            f"retry after {retry_after_s} s"
        )
