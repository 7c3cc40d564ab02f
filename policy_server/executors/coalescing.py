"""Coalescing concurrent tasks into batches, shared by the `local` and `ray` executors.

Tasks wait in a pending list. When a batch may leave (fewer than `max_in_flight` batches are in
flight), everything pending, up to `max_rows` rows, leaves as one batch; what arrives meanwhile
forms the next batch, so a lone task never waits and batches grow with load. `wait_s` > 0
additionally holds a batch that long for more rows. A batch never mixes what its tasks run on
(`on`: the version that was active when each was accepted).

No batching task sits in between: the task that finds a free slot schedules the batch one loop
turn later (so tasks parsed in the same turn join it), and each delivered batch schedules the
next. `local` computes one batch at a time; `ray` keeps a few handle calls in flight, so that
every replica has work while the answers of another call travel back.
"""

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from policy_server.errors import InputError, PolicyFailure
from policy_server.policy import Result, Task

On = TypeVar("On")


@dataclass(frozen=True, slots=True)
class Pending(Generic[On]):
    task: Task
    future: "asyncio.Future[Result]"
    on: On


Launch = Callable[[list[Pending[On]], int], None]  # a batch and its rows: compute it, then deliver()


class Coalescer(Generic[On]):
    """Gathers submitted tasks into batches and hands each to `launch`, which must call `deliver`
    (on the event loop) with one result per task once the batch is answered."""

    def __init__(self, loop: asyncio.AbstractEventLoop, launch: Launch[On], max_rows: int, wait_s: float = 0.0) -> None:
        self.max_rows = max_rows
        self.max_in_flight = 1  # batches launched and not yet delivered; the ray executor raises it
        self._loop = loop
        self._launch = launch
        self._wait_s = wait_s
        self._pending: list[Pending[On]] = []
        self._pending_rows = 0
        self._in_flight = 0
        self._scheduled = False  # a dispatch is due: next loop turn, or when the wait ends
        self._wait: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, task: Task, on: On) -> "asyncio.Future[Result]":
        """The task's future: its result, or its InputError or PolicyFailure raised."""
        future: asyncio.Future[Result] = self._loop.create_future()
        self._pending.append(Pending(task, future, on))
        self._pending_rows += len(task.rows)
        self._idle.clear()
        if not self._scheduled:
            if self._in_flight < self.max_in_flight:
                self._schedule(hold=True)
        elif self._wait is not None and self._pending_rows >= self.max_rows:
            self._dispatch()  # the waiting batch is full: no need to wait longer
        return future

    async def idle(self) -> None:
        """Return once every submitted task has been answered."""
        await self._idle.wait()

    def deliver(self, batch: Sequence[Pending[On]], results: Sequence[Result]) -> None:
        """Settle each task's future with its result (an error raised), then let the next batch go."""
        for item, result in zip(batch, results, strict=True):
            if item.future.done():  # the client went away
                continue
            if isinstance(result, InputError | PolicyFailure):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        self._in_flight -= 1
        if self._pending:
            self._schedule(hold=False)  # after this turn: its tasks can join the next batch
        else:
            self._settle()

    def _schedule(self, hold: bool) -> None:
        if self._scheduled or self._in_flight >= self.max_in_flight:
            return
        self._scheduled = True
        if hold and self._wait_s > 0 and self._pending_rows < self.max_rows:
            self._wait = self._loop.call_later(self._wait_s, self._dispatch)
        else:
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Launch the next batch (on the event loop)."""
        self._scheduled = False
        if self._wait is not None:
            self._wait.cancel()
            self._wait = None
        if not self._pending:
            self._settle()
            return
        first = self._pending[0]
        count, rows = 1, len(first.task.rows)
        for item in self._pending[1:]:
            if item.on is not first.on or rows + len(item.task.rows) > self.max_rows:
                break
            count += 1
            rows += len(item.task.rows)
        batch = self._pending[:count]
        del self._pending[:count]
        self._pending_rows -= rows
        self._in_flight += 1
        self._launch(batch, rows)
        if self._pending:
            self._schedule(hold=False)  # a full batch left and a slot is free: the rest follows

    def _settle(self) -> None:
        if not self._pending and not self._in_flight and not self._scheduled:
            self._idle.set()
