"""Executors move `Task`s to a `Policy` and results back: in-process (`local`) or via Ray Serve.

Routes talk to the `Executor` protocol only, so a backend plugs in without touching routes or
policy math.
"""

from typing import Any, Protocol

from policy_server.policy import Result, Task


class Executor(Protocol):
    backend: str
    # True: the app opens its port while start() runs (/ready 503 meanwhile) instead of after it:
    # for backends that take many seconds to start, so /health answers and /ready tells.
    starts_in_background: bool

    async def start(self) -> None:
        """Load or deploy, warm up; return once the policy answers."""

    async def stop(self) -> None:
        """Answer what was accepted, then release threads or deployments."""

    @property
    def ready(self) -> bool: ...

    async def run(self, task: Task) -> Result:
        """One task's result; raises PolicyFailure when the model fails."""

    def describe(self) -> dict[str, Any]:
        """Model, input size, heads, device, replicas: for /schema and /info."""
