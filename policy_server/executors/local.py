"""The default executor: the policy in this process, concurrent requests coalesced.

Requests queue up; one batching task takes everything queued (up to `max_batch_size` rows) and
runs it as one forward pass on a dedicated worker thread, off the event loop. While that pass
runs, new requests queue and form the next batch, so a lone request never waits and throughput
rises with load. `batch_wait_ms` > 0 additionally holds a batch that long for more rows.
"""

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from policy_server.errors import InputError, PolicyFailure
from policy_server.policy import Policy, Result, Task

logger = logging.getLogger("policy_server")

_Pending = tuple[Task, "asyncio.Future[Result]"]


class LocalExecutor:
    backend = "local"

    def __init__(self, policy: Policy, max_batch_size: int = 64, batch_wait_ms: float = 0.0, torch_threads: int = 1) -> None:
        self.policy = policy
        self.max_batch_rows = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.torch_threads = torch_threads
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._held: _Pending | None = None  # taken out but too big for the batch it met
        self._worker: ThreadPoolExecutor | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        torch.set_num_threads(self.torch_threads)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        await asyncio.get_running_loop().run_in_executor(self._worker, self.policy.warm_up)
        self._batcher = asyncio.create_task(self._batch_loop(), name="policy-batcher")
        self._ready = True

    async def stop(self) -> None:
        """Answer every queued task, then end the batcher and the worker thread."""
        self._ready = False
        if self._batcher is not None:
            self._queue.put_nowait(None)
            await self._batcher
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    async def run(self, task: Task) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((task, future))
        return await future

    def describe(self) -> dict[str, Any]:
        return self.policy.describe() | {"backend": self.backend, "replicas": 1}

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            try:
                results = await loop.run_in_executor(self._worker, self.policy.run, [task for task, _ in batch])
            except Exception:
                error_id = uuid.uuid4().hex[:12]
                logger.exception("the policy failed on a batch of %d requests (error id %s)", len(batch), error_id)
                results = [PolicyFailure(error_id)] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(result, InputError | PolicyFailure):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _next_batch(self) -> list[_Pending] | None:
        """The next batch to compute; None once stop() was called and all before it is done."""
        first = self._held or await self._queue.get()
        self._held = None
        if first is None:
            return None
        batch, rows = [first], len(first[0].rows)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        while rows < self.max_batch_rows:
            item = await self._take(deadline - loop.time())
            if item is None:
                break
            if rows + len(item[0].rows) > self.max_batch_rows:
                self._held = item
                break
            batch.append(item)
            rows += len(item[0].rows)
        return batch

    async def _take(self, wait_s: float) -> _Pending | None:
        """A queued task, waiting at most `wait_s` for one; a stop request stays queued."""
        if self._queue.empty():
            if wait_s <= 0:
                return None
            try:
                item = await asyncio.wait_for(self._queue.get(), wait_s)
            except TimeoutError:
                return None
        else:
            item = self._queue.get_nowait()
        if item is None:
            self._queue.put_nowait(None)  # stop after this batch and anything queued behind it
        return item
