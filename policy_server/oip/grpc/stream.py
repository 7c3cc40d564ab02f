"""One ModelStreamInfer call: requests read as they come, answered as they are decided.

The messages of a stream are decided concurrently (up to `WINDOW` at once), so the requests of
one stream, like those of many clients, share forward passes (gathering.py); answers leave in
the order they are ready, each carrying its request's `id`. Two requests naming the same sequence (the same
episode) are decided in the order they came. A full window stops reading: gRPC's flow control
then holds the client back, rather than the policy's queue refusing it.

A drain (SIGTERM) does not cut a stream: its requests are still answered until it has been quiet
for `QUIET_S` (the robot stopped, or every request it sent before the drain is answered), then
the stream ends and says why, so the client opens a new one elsewhere.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from policy_server.drain import QUIET_S
from policy_server.oip.errors import OipError
from policy_server.oip.grpc import inference_pb2 as pb

WINDOW = 64  # requests of one stream being decided at once

# The answer to one request, or the error that ends the whole stream (a key that does not open the model).
Answer = pb.ModelStreamInferResponse | OipError
Answerer = Callable[[pb.ModelInferRequest], Awaitable[Answer]]


class StreamSession:
    """Reads a stream's requests, has `answer` decide each, and hands out the answers."""

    def __init__(self, answer: Answerer, on_message: Callable[[], None]) -> None:
        self._answer = answer
        self._on_message = on_message
        self._outbox: asyncio.Queue[Answer | None] = asyncio.Queue()  # None: only wakes the writer
        self._window = asyncio.Semaphore(WINDOW)
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_of_sequence: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._read_all = False
        self._draining = False
        self._last_message = time.monotonic()

    @property
    def drained(self) -> bool:
        """Whether the stream ended because of a drain (not because the client closed it)."""
        return self._draining and not self._read_all

    def drain(self) -> None:
        """From now on, end once quiet."""
        self._draining = True
        self._outbox.put_nowait(None)

    async def answers(self, requests: AsyncIterator[pb.ModelInferRequest]) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Every answer, until the client closed its side and all is answered (or, in a drain,
        the stream is quiet). Raises the OipError that ends the stream, if one does."""
        reader = asyncio.create_task(self._read(requests))
        reader.add_done_callback(_quietly)
        try:
            while not self._finished():
                try:
                    item = await asyncio.wait_for(self._outbox.get(), QUIET_S if self._draining else None)
                except TimeoutError:
                    continue
                if isinstance(item, OipError):
                    raise item
                if item is not None:
                    yield item
        finally:
            reader.cancel()
            for task in self._tasks:
                task.cancel()

    def _finished(self) -> bool:
        if self._pending or not self._outbox.empty():
            return False
        return self._read_all or (self._draining and time.monotonic() - self._last_message >= QUIET_S)

    async def _read(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        try:
            async for request in requests:
                self._last_message = time.monotonic()
                self._on_message()
                await self._window.acquire()
                self._spawn(request)
        finally:
            self._read_all = True
            self._outbox.put_nowait(None)

    def _spawn(self, request: pb.ModelInferRequest) -> None:
        sequence = _sequence_of(request)
        previous = self._last_of_sequence.get(sequence) if sequence is not None else None
        self._pending += 1
        task = asyncio.create_task(self._decide(request, previous))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if sequence is not None:
            self._last_of_sequence[sequence] = task
            task.add_done_callback(lambda done: self._forget(sequence, done))

    async def _decide(self, request: pb.ModelInferRequest, previous: "asyncio.Task[None] | None") -> None:
        try:
            if previous is not None:
                await asyncio.wait([previous])
            self._outbox.put_nowait(await self._answer(request))
        finally:
            self._pending -= 1
            self._window.release()

    def _forget(self, sequence: tuple[str, str], task: "asyncio.Task[None]") -> None:
        if self._last_of_sequence.get(sequence) is task:
            del self._last_of_sequence[sequence]


def _quietly(reader: "asyncio.Task[None]") -> None:
    """A stream whose client went away fails its read: nobody is left to tell, so it is not reported."""
    if not reader.cancelled():
        reader.exception()


def _sequence_of(request: pb.ModelInferRequest) -> tuple[str, str] | None:
    """The model and sequence a request names (its raw value: it is checked when decided)."""
    parameter = request.parameters.get("sequence_id")
    choice = parameter.WhichOneof("parameter_choice") if parameter is not None else None
    if choice is None:
        return None
    value = getattr(parameter, choice)
    return None if value in (0, "") else (request.model_name, str(value))
