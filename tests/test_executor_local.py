"""The local micro-batcher (policy_server/executors/local.py), against a real policy loaded from disk.

The model callable is wrapped to record what each forward pass received; every result is compared
with the one the policy computes for that task alone.
"""

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import MOUSE_SCHEMA, mlp, save_model

from policy_server.errors import InputError, PolicyFailure
from policy_server.executors.local import LocalExecutor
from policy_server.loading import load_policy, load_policy_spec
from policy_server.policy import Decisions, Distributions, Kind, Policy, Result, Task

POISON = 999.0  # a row starting with this makes the recording model raise


class RecordingModel:
    """Wraps a policy's model: records each forward pass's rows; can be slowed down or made to fail."""

    def __init__(self, model: Callable[[np.ndarray], list[np.ndarray]], delay_s: float = 0.0, delay_per_row_s: float = 0.0) -> None:
        self.model = model
        self.delay_s = delay_s
        self.delay_per_row_s = delay_per_row_s
        self.passes: list[np.ndarray] = []
        self.failed: list[bool] = []
        self.threads: set[str] = set()

    @property
    def sizes(self) -> list[int]:
        return [len(rows) for rows in self.passes]

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        self.passes.append(rows.copy())
        self.threads.add(threading.current_thread().name)
        if self.delay_s or self.delay_per_row_s:
            time.sleep(self.delay_s + self.delay_per_row_s * len(rows))
        poisoned = bool((rows[:, 0] == POISON).any())
        self.failed.append(poisoned)
        if poisoned:
            raise RuntimeError("the model broke on purpose")
        return self.model(rows)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("executor") / "mouse"
    folder.mkdir()
    (folder / "schema.yaml").write_text(MOUSE_SCHEMA)
    save_model(mlp(6, 4, seed=5), folder / "models" / "model.pt", 6)
    return folder


@pytest.fixture
def policy(policy_dir: Path) -> Policy:
    return load_policy(policy_dir, load_policy_spec(policy_dir))


INLINE, ON_WORKER = 60_000.0, 0.0  # inline_budget_ms: every batch on the event loop / on the worker thread


@pytest.fixture(params=[INLINE, ON_WORKER], ids=["inline", "on-worker"])
def budget_ms(request: pytest.FixtureRequest) -> float:
    """Batching must behave the same wherever the batches run."""
    return float(request.param)


def _tasks(count: int, rows_per_task: Sequence[int] = (1,), seed: int = 0) -> list[Task]:
    """Distinct rows; kinds and seeds vary, so every route's kind of answer is in the mix."""
    rng = np.random.default_rng(seed)
    kinds = [Kind.DETERMINISTIC, Kind.DISTRIBUTION, Kind.SAMPLE]
    tasks = []
    for i in range(count):
        rows = rng.uniform(-3, 3, size=(rows_per_task[i % len(rows_per_task)], 6)).astype(np.float32)
        kind = kinds[i % 3]
        tasks.append(Task(rows, kind, seed=1000 + i if kind is Kind.SAMPLE else None))
    return tasks


def _alone(policy: Policy, task: Task) -> Result:
    (result,) = policy.run([task])
    return result


def _assert_same(result: Result, expected: Result) -> None:
    if isinstance(expected, Decisions):
        assert isinstance(result, Decisions)
        assert result.actions == expected.actions
        assert result.probabilities == pytest.approx(expected.probabilities, rel=1e-5)
    else:
        assert isinstance(result, Distributions) and isinstance(expected, Distributions)
        assert len(result.rows) == len(expected.rows)
        for got_row, want_row in zip(result.rows, expected.rows, strict=True):
            for got, want in zip(got_row, want_row, strict=True):
                assert got["name"] == want["name"]
                assert got["probabilities"] == pytest.approx(want["probabilities"], rel=1e-5, abs=1e-9)


def _policy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("policy")]


async def _started(executor: LocalExecutor) -> RecordingModel:
    await executor.start()
    recorder = RecordingModel(executor.policy.model)
    executor.policy.model = recorder  # after start(): the warm-up pass is not counted
    return recorder


async def _all_at_once(executor: LocalExecutor, tasks: list[Task]) -> tuple[list[Result], RecordingModel]:
    """Start the executor, submit every task concurrently, stop it; the results and the passes seen."""
    recorder = await _started(executor)
    try:
        results = await asyncio.gather(*(executor.run(task) for task in tasks))
    finally:
        await executor.stop()
    return list(results), recorder


def test_concurrent_requests_are_coalesced(policy: Policy, budget_ms: float) -> None:
    tasks = _tasks(64)
    expected = [_alone(policy, task) for task in tasks]
    executor = LocalExecutor(policy, max_batch_size=64, inline_budget_ms=budget_ms)

    results, recorder = asyncio.run(_all_at_once(executor, tasks))
    assert max(recorder.sizes) > 1, recorder.sizes
    assert sum(recorder.sizes) == 64
    assert len(recorder.sizes) < 64
    if budget_ms == INLINE:
        assert recorder.threads == {threading.current_thread().name}
    else:
        assert all(name.startswith("policy") for name in recorder.threads)  # off the event loop
    for result, want in zip(results, expected, strict=True):
        _assert_same(result, want)


def test_multi_row_tasks_are_split_back_correctly(policy: Policy, budget_ms: float) -> None:
    tasks = _tasks(30, rows_per_task=(1, 3, 2, 5))
    expected = [_alone(policy, task) for task in tasks]
    executor = LocalExecutor(policy, max_batch_size=16, inline_budget_ms=budget_ms)

    results, recorder = asyncio.run(_all_at_once(executor, tasks))
    assert sum(recorder.sizes) == sum(len(task.rows) for task in tasks)
    assert max(recorder.sizes) > 5
    for result, want, task in zip(results, expected, tasks, strict=True):
        _assert_same(result, want)
        rows = len(result.actions) if isinstance(result, Decisions) else len(result.rows)
        assert rows == len(task.rows)


def test_max_batch_size_is_respected_except_for_one_big_task(policy: Policy, budget_ms: float) -> None:
    small = _tasks(40, rows_per_task=(1, 2, 3), seed=1)
    big = _tasks(1, rows_per_task=(20,), seed=2)[0]
    tasks = [*small[:20], big, *small[20:]]
    expected = [_alone(policy, task) for task in tasks]
    executor = LocalExecutor(policy, max_batch_size=8, inline_budget_ms=budget_ms)

    results, recorder = asyncio.run(_all_at_once(executor, tasks))
    assert sum(recorder.sizes) == sum(len(task.rows) for task in tasks)
    oversized = [rows for rows in recorder.passes if len(rows) > 8]
    assert len(oversized) == 1
    np.testing.assert_array_equal(oversized[0], big.rows)  # the big task went alone
    assert any(1 < size <= 8 for size in recorder.sizes)
    for result, want in zip(results, expected, strict=True):
        _assert_same(result, want)


def _two_spaced_requests(policy: Policy, batch_wait_ms: float, budget_ms: float) -> list[int]:
    """One request, a pause, a second one: the batch sizes the model saw."""
    executor = LocalExecutor(policy, max_batch_size=2, batch_wait_ms=batch_wait_ms, inline_budget_ms=budget_ms)
    first, second = _tasks(2, seed=3)
    expected = [_alone(policy, first), _alone(policy, second)]

    async def scenario() -> list[int]:
        recorder = await _started(executor)
        try:
            pending = asyncio.create_task(executor.run(first))
            await asyncio.sleep(0.2)
            answers = await asyncio.gather(pending, executor.run(second))
        finally:
            await executor.stop()
        for answer, want in zip(answers, expected, strict=True):
            _assert_same(answer, want)
        return recorder.sizes

    return asyncio.run(scenario())


def test_batch_wait_collects_more_rows(policy: Policy, budget_ms: float) -> None:
    assert _two_spaced_requests(policy, 0, budget_ms) == [1, 1]
    # Held up to 30 s for a second row; max_batch_size=2 sends it as soon as that row arrives.
    assert _two_spaced_requests(policy, 30_000, budget_ms) == [2]


def test_stop_answers_everything_queued_and_ends_the_thread(policy: Policy, budget_ms: float) -> None:
    tasks = _tasks(40, seed=4)
    expected = [_alone(policy, task) for task in tasks]
    executor = LocalExecutor(policy, max_batch_size=4, inline_budget_ms=budget_ms)

    async def scenario() -> tuple[list[Result], RecordingModel, int]:
        recorder = await _started(executor)
        recorder.delay_s = 0.02  # so that most tasks are still queued when stop() is called
        pending = [asyncio.create_task(executor.run(task)) for task in tasks]
        await asyncio.sleep(0)  # every task has been handed to the executor
        computed_before_stop = sum(recorder.sizes)
        await executor.stop()
        assert not executor.ready
        assert all(task.done() for task in pending)
        return [task.result() for task in pending], recorder, computed_before_stop

    results, recorder, computed_before_stop = asyncio.run(scenario())
    assert computed_before_stop < 40  # most tasks were still waiting when stop() was called
    assert sum(recorder.sizes) == 40 and max(recorder.sizes) <= 4
    for result, want in zip(results, expected, strict=True):
        _assert_same(result, want)
    assert _policy_threads() == []


def test_start_and_stop_leave_no_thread(policy: Policy) -> None:
    async def scenario() -> None:
        executor = LocalExecutor(policy)
        await executor.start()
        assert executor.ready
        assert _policy_threads()
        await executor.stop()

    asyncio.run(scenario())
    assert _policy_threads() == []


def test_a_failing_input_fails_only_its_task(policy: Policy, budget_ms: float, caplog: pytest.LogCaptureFixture) -> None:
    """The model raises on a batch because of one task's rows: the batch runs again in halves, and
    only that task fails, under an error id of its own logged with the traceback."""
    caplog.set_level(logging.WARNING, logger="policy_server")
    tasks = _tasks(16, seed=6)
    poisoned_index = 9
    tasks[poisoned_index].rows[0, 0] = POISON
    expected = [_alone(policy, task) if i != poisoned_index else None for i, task in enumerate(tasks)]
    after = _tasks(5, seed=7)
    observed: list[int] = []
    executor = LocalExecutor(policy, max_batch_size=8, inline_budget_ms=budget_ms, observe_batch=lambda rows, _: observed.append(rows))

    async def scenario() -> tuple[list[Result | BaseException], list[Result], RecordingModel]:
        recorder = await _started(executor)
        try:
            results = await asyncio.gather(*(executor.run(task) for task in tasks), return_exceptions=True)
            later = await asyncio.gather(*(executor.run(task) for task in after))
        finally:
            await executor.stop()
        return list(results), list(later), recorder

    results, later, recorder = asyncio.run(scenario())
    first_failure = recorder.failed.index(True)
    assert len(recorder.passes[first_failure]) == 8  # the poisoned task shared a batch of 8
    assert [len(rows) for rows, failed in zip(recorder.passes, recorder.failed, strict=True) if failed] == [8, 4, 2, 1]  # halved down to it
    failure = results[poisoned_index]
    assert isinstance(failure, PolicyFailure) and re.fullmatch(r"[0-9a-f]{12}", failure.error_id)
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        if i != poisoned_index:
            assert want is not None and not isinstance(result, BaseException), (i, result)
            _assert_same(result, want)
    logged = [r for r in caplog.records if failure.error_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the traceback is logged under that id
    assert any("failed on a batch of 8 requests" in r.getMessage() for r in caplog.records)
    assert sum(observed) == 15 + 5  # the metrics count each row answered once, the failed one not
    for result, task in zip(later, after, strict=True):
        _assert_same(result, _alone(policy, task))


def test_an_input_error_fails_only_its_task(policy: Policy, budget_ms: float) -> None:
    tasks = _tasks(8, seed=8)
    narrow = Task(np.zeros((1, 5), dtype=np.float32), Kind.DETERMINISTIC)
    tasks.insert(3, narrow)
    executor = LocalExecutor(policy, max_batch_size=64, inline_budget_ms=budget_ms)

    async def scenario() -> list[Result | BaseException]:
        await executor.start()
        try:
            return list(await asyncio.gather(*(executor.run(task) for task in tasks), return_exceptions=True))
        finally:
            await executor.stop()

    results = asyncio.run(scenario())
    assert isinstance(results[3], InputError)
    for i, (result, task) in enumerate(zip(results, tasks, strict=True)):
        if i != 3:
            assert not isinstance(result, BaseException)
            _assert_same(result, _alone(policy, task))


def test_a_cancelled_request_does_not_break_the_loop(policy: Policy) -> None:
    """On the worker, so that a cancelled request's batch can be mid-computation."""
    tasks = _tasks(12, seed=9)
    executor = LocalExecutor(policy, max_batch_size=2, inline_budget_ms=ON_WORKER)

    expected = [_alone(policy, task) for task in tasks]

    async def scenario() -> tuple[list[Result | BaseException], Result]:
        recorder = await _started(executor)
        recorder.delay_s = 0.05
        try:
            pending = [asyncio.create_task(executor.run(task)) for task in tasks]
            await asyncio.sleep(0.01)  # the first batch is in the worker, the rest queued
            pending[0].cancel()  # its batch is running
            pending[5].cancel()  # still queued
            pending[6].cancel()
            results = await asyncio.gather(*pending, return_exceptions=True)
            recorder.delay_s = 0.0
            later = await executor.run(tasks[5])
        finally:
            await executor.stop()
        return list(results), later

    results, later = asyncio.run(scenario())
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        if i in (0, 5, 6):
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert not isinstance(result, BaseException), result
            _assert_same(result, want)
    _assert_same(later, expected[5])
    assert _policy_threads() == []


def test_batches_run_where_their_measured_cost_says(policy: Policy) -> None:
    """A model taking 0.1 ms a row, a budget of 2 ms: one-row batches run on the event loop,
    a 40-row task (~4 ms, estimated from the start-up timings) on the worker thread."""
    executor = LocalExecutor(policy, max_batch_size=64, inline_budget_ms=2.0)
    recorder = RecordingModel(policy.model, delay_per_row_s=0.0001)
    policy.model = recorder  # before start(): the start-up timings see the slow model
    small, big = _tasks(1, seed=10)[0], _tasks(1, rows_per_task=(40,), seed=11)[0]

    async def scenario() -> list[str]:
        await executor.start()
        places = []
        try:
            for task in (small, big, small):
                recorder.threads.clear()
                await executor.run(task)
                (place,) = recorder.threads
                places.append(place)
        finally:
            await executor.stop()
        return places

    loop_thread = threading.current_thread().name
    first, second, third = asyncio.run(scenario())
    assert first == third == loop_thread
    assert second.startswith("policy")


def test_describe_names_the_backend(policy: Policy) -> None:
    described = LocalExecutor(policy).describe()
    assert described["backend"] == "local" and described["replicas"] == 1
    assert described["input_size"] == 6 and described["format"] == "torchscript"
