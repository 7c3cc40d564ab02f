"""Requests that arrive back to back go on together, so the executor makes one batch of them.

The executors batch what is submitted in the same loop turn (executors/coalescing.py). HTTP
requests arriving together are parsed in one turn; gRPC hands calls and a stream's messages over
one per turn, so, submitted as they come, each would be a forward pass of its own (the batch-size
histogram showed count == sum under a stream). So every gRPC request first waits here until
`QUIET_TURNS` loop turns pass without another arriving, then all those waiting go on in the
same turn. A lone request waits those few turns (microseconds); a burst waits until it ends, or
until `MAX_GATHERED` are waiting.
"""

import asyncio

QUIET_TURNS = 2
MAX_GATHERED = 256  # the policy's default queue bound: more at once could only be refused


class Gathering:
    def __init__(self) -> None:
        self._waiting: list[asyncio.Future[None]] = []
        self._check: asyncio.Handle | None = None

    async def arrived(self) -> None:
        """Returns in the turn every request waiting with this one goes on."""
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiting)
        if len(self._waiting) >= MAX_GATHERED:
            self._release()
        elif self._check is None:
            self._schedule(QUIET_TURNS)
        await waiting

    def _schedule(self, turns_left: int) -> None:
        self._check = asyncio.get_running_loop().call_soon(self._quiet_for, len(self._waiting), turns_left)

    def _quiet_for(self, seen: int, turns_left: int) -> None:
        if len(self._waiting) > seen:
            self._schedule(QUIET_TURNS)
        elif turns_left > 1:
            self._check = asyncio.get_running_loop().call_soon(self._quiet_for, seen, turns_left - 1)
        else:
            self._release()

    def _release(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():  # its call may have been cancelled meanwhile
                future.set_result(None)
