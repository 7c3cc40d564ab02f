"""Executors move `Task`s to a `Policy` and results back: in-process (`local`) or via Ray Serve.

Routes talk to the `Executor` protocol only, so a backend plugs in without touching routes or
policy math. Both backends answer a batch of tasks with `run_isolating_failures`.
"""

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from policy_server.errors import PolicyFailure, model_error_line
from policy_server.loading import ModelVersion
from policy_server.policy import Policy, Result, Task

logger = logging.getLogger("policy_server")


class Executor(Protocol):
    backend: str
    # True: the app opens its port while start() runs (/ready 503 meanwhile) instead of after it:
    # for backends that take many seconds to start, so /health answers and /ready tells.
    starts_in_background: bool

    async def start(self) -> None:
        """Load or deploy, warm up; return once the policy answers."""

    async def switch(self, version: ModelVersion) -> None:
        """Load `version` beside the active one, check it, then make it active: requests accepted
        before finish on the old one, none fails. Raises (the old one serving on) if it cannot load."""

    async def stop(self) -> None:
        """Answer what was accepted, then release threads or deployments."""

    @property
    def ready(self) -> bool: ...

    async def run(self, task: Task) -> Result:
        """One task's result, which names the version that answered; raises PolicyFailure when the model fails."""

    def describe(self) -> dict[str, Any]:
        """Model, input size, heads, device, replicas: for /schema and /info."""


class ForwardPass(NamedTuple):
    """A forward pass that answered its tasks: the index of its first task in the batch, its rows, its seconds."""

    first_task: int
    rows: int
    seconds: float


def run_isolating_failures(policy: Policy, tasks: Sequence[Task]) -> tuple[list[Result], list[ForwardPass]]:
    """Every task's result, from one forward pass unless the model raises, and the passes that answered.

    The model raising on several tasks may be one task's input: then each half runs again, and so
    on down, so that only a task that fails on its own gets a `PolicyFailure` (its own error id, its
    traceback logged) and every other task its result, as if it had come alone. k failing tasks
    among n cost about 2·k·log2(n/k) extra passes; a batch that does not fail costs nothing extra.
    """
    passes: list[ForwardPass] = []
    return _run_in_halves(policy, tasks, 0, passes, whole_batch=True), passes


def _run_in_halves(policy: Policy, tasks: Sequence[Task], first_task: int, passes: list[ForwardPass], whole_batch: bool) -> list[Result]:
    started = time.perf_counter()
    try:
        results = policy.run(tasks)
    except Exception as exc:
        failure = exc  # handled below, so that a half's traceback does not chain this one
    else:
        passes.append(ForwardPass(first_task, sum(len(task.rows) for task in tasks), time.perf_counter() - started))
        return results
    if len(tasks) == 1:
        error_id = uuid.uuid4().hex[:12]
        logger.error("the policy failed on a request (error id %s)", error_id, exc_info=failure)
        return [PolicyFailure(error_id)]
    if whole_batch:
        logger.warning(
            "the policy failed on a batch of %d requests (%s): running them again in halves, to fail only the ones that fail alone",
            len(tasks),
            model_error_line(failure),
        )
    half = len(tasks) // 2
    return [
        *_run_in_halves(policy, tasks[:half], first_task, passes, whole_batch=False),
        *_run_in_halves(policy, tasks[half:], first_task + half, passes, whole_batch=False),
    ]
