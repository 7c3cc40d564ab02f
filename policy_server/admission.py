"""Load shedding: at most `limit` prediction requests wait or run per policy; beyond, 503 at once.

Without a bound, hundreds of clients all wait in line and every answer comes late; with one, the
requests beyond it are refused in microseconds with `Retry-After`, and the admitted ones are
answered as fast as the policy allows. The bound counts requests (a /predict_batch is one).
"""

from collections.abc import Callable

from policy_server.executors import Executor
from policy_server.policy import Result, Task

RETRY_AFTER_S = 1


class Overloaded(Exception):
    """More requests are waiting than the policy's queue holds: answered 503 with Retry-After."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.retry_after_s = RETRY_AFTER_S
        super().__init__(
            f"The policy is at its limit of {limit} requests waiting or running: retry after {RETRY_AFTER_S} s, "
            "send several observations per /predict_batch, or raise POLICY_SERVER_MAX_QUEUE."
        )


class Admission:
    """Runs tasks on `executor` while fewer than `limit` are admitted; refuses the rest."""

    def __init__(self, executor: Executor, limit: int, on_shed: Callable[[], None] | None = None) -> None:
        self.executor = executor
        self.limit = limit
        self.admitted = 0
        self.shed = 0
        self._on_shed = on_shed

    async def run(self, task: Task) -> Result:
        if self.admitted >= self.limit:
            self.shed += 1
            if self._on_shed is not None:
                self._on_shed()
            raise Overloaded(self.limit)
        self.admitted += 1
        try:
            return await self.executor.run(task)
        finally:
            self.admitted -= 1
