"""The default executor: the policy in this process, concurrent requests coalesced.

Requests are coalesced into batches (coalescing.py): one batch at a time, one forward pass each,
so a lone request never waits and throughput rises with load. When the model raises on a batch,
its tasks run again in halves, so one client's bad input fails that client's request only.

Where a batch runs depends on its cost. Handing a batch to the worker thread and back costs a
round trip through the event loop (~90 µs on a 2-core VM, more under load), about what a small
policy needs for a whole small batch; and a small policy's forward pass is mostly Python holding
the GIL, so the loop could not run beside it anyway. So a batch whose estimated forward pass is
under `inline_budget_ms` (1 ms by default) runs on the event loop; any other batch runs on the
worker thread, so a large batch or a slow model never stalls the server. The estimate is linear
in rows, from the policy timed at start-up on one row and on a full batch.

`switch` loads another version beside the active one (on a thread of its own: requests go on
being answered), warms and times it, then makes it active in one step. A task runs on the
version that was active when it was accepted: a batch never mixes versions.
"""

import asyncio
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy_server.executors import run_isolating_failures
from policy_server.executors.coalescing import Coalescer, Pending
from policy_server.loading import ModelVersion, load_version
from policy_server.policy import Kind, Policy, Result, Task
from policy_server.runtimes import gpu_memory

_CALIBRATION_REPEATS = 15
_CALIBRATION_BUDGET_S = 0.25  # a slow model is timed fewer times: its batches go to the worker anyway


@dataclass(frozen=True)
class CostModel:
    """A batch's forward pass, estimated from timings of one row and of a full batch."""

    one_row_s: float
    per_extra_row_s: float

    def seconds(self, rows: int) -> float:
        return self.one_row_s + (rows - 1) * self.per_extra_row_s


@dataclass(frozen=True)
class Active:
    """A loaded version and its measured cost: what a task accepted now runs on."""

    policy: Policy
    cost: CostModel


class LocalExecutor:
    backend = "local"
    starts_in_background = False

    def __init__(
        self,
        policy: Policy,
        max_batch_size: int = 64,
        batch_wait_ms: float = 0.0,
        torch_threads: int = 1,
        observe_batch: Callable[[int, float], None] | None = None,
        inline_budget_ms: float = 1.0,
        model_cache_dir: Path | None = None,
    ) -> None:
        self.policy = policy  # the active version's; becomes `_active.policy` once timed at start
        self.inline_budget_s = inline_budget_ms / 1000  # batches estimated cheaper run on the event loop
        self.model_cache_dir = model_cache_dir  # for the versions `switch` loads
        self._active: Active | None = None
        self.observe_batch = observe_batch  # (rows, seconds) of each batch, for the metrics
        self.max_batch_rows = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.torch_threads = torch_threads
        self._batches: Coalescer[Active] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def cost(self) -> CostModel | None:
        return self._active.cost if self._active is not None else None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        torch.set_num_threads(self.torch_threads)  # per thread: here for the batches run on the loop, in _prepare for the worker's
        self._active = await self._loop.run_in_executor(self._worker, self._prepare, self.policy)
        self._batches = Coalescer(self._loop, self._launch, self.max_batch_rows, self.batch_wait_s)
        self._ready = True

    async def switch(self, version: ModelVersion) -> None:
        """Load `version` beside the active one, warm and time it, then make it active.

        Raises what loading raises (a `ConfigError` for a model that does not fit its schema);
        the active version is untouched then."""
        policy = await asyncio.to_thread(load_version, version, "cpu", self.model_cache_dir)
        self._active = await asyncio.to_thread(self._prepare, policy)
        self.policy = policy

    def _prepare(self, policy: Policy) -> Active:
        torch.set_num_threads(self.torch_threads)
        policy.warm_up()
        return Active(policy, self._measure_cost(policy))

    def _measure_cost(self, policy: Policy) -> CostModel:
        one_row, full = self._time_policy(policy, 1), self._time_policy(policy, self.max_batch_rows)
        per_extra_row = (full - one_row) / (self.max_batch_rows - 1) if self.max_batch_rows > 1 else 0.0
        return CostModel(one_row, max(per_extra_row, 0.0))

    def _time_policy(self, policy: Policy, rows: int) -> float:
        """The median of a few runs (a slow model is timed fewer times)."""
        task = Task(np.zeros((rows, policy.input_size), dtype=np.float32), Kind.SAMPLE)
        timings: list[float] = []
        while len(timings) < _CALIBRATION_REPEATS and sum(timings) < _CALIBRATION_BUDGET_S:
            started = time.perf_counter()
            policy.run([task])
            timings.append(time.perf_counter() - started)
        return statistics.median(timings)

    async def stop(self) -> None:
        """Answer every accepted task, then end the worker thread."""
        self._ready = False
        if self._batches is not None:
            await self._batches.idle()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    async def run(self, task: Task) -> Result:
        assert self._batches is not None and self._active is not None, "start() first"
        return await self._batches.submit(task, self._active)

    def describe(self) -> dict[str, Any]:
        info = self.policy.describe()
        return info | {"backend": self.backend, "replicas": 1, "gpu_memory": gpu_memory(info["device"])}

    def _launch(self, batch: list[Pending[Active]], rows: int) -> None:
        """Run the batch inline or on the worker (on the event loop)."""
        assert self._worker is not None and self._batches is not None
        if batch[0].on.cost.seconds(rows) < self.inline_budget_s:
            self._batches.deliver(batch, self._compute(batch))
        else:
            self._worker.submit(self._compute_on_worker, batch)

    def _compute_on_worker(self, batch: list[Pending[Active]]) -> None:
        results = self._compute(batch)
        assert self._loop is not None and self._batches is not None
        self._loop.call_soon_threadsafe(self._batches.deliver, batch, results)

    def _compute(self, batch: list[Pending[Active]]) -> list[Result]:
        """One forward pass for the batch; a task whose input makes the model fail fails alone."""
        results, passes = run_isolating_failures(batch[0].on.policy, [item.task for item in batch])
        if self.observe_batch is not None:
            for forward_pass in passes:
                self.observe_batch(forward_pass.rows, forward_pass.seconds)
        return results
