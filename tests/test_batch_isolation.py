"""One client's bad input must fail that client's request only, however requests are coalesced.

The models are real files (TorchScript, torch.export) that fail for some observations within the
schema's bounds: they raise, or return NaN, when `mouse_row` is above 3.5 (the schema allows up to 4).
Tested on the local executor directly, then over HTTP with `uvicorn app:app` under concurrent load.
"""

import asyncio
import logging
import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import AUTH, MOUSE_SCHEMA, MakePolicyDir, mouse_observation
from servers import free_port, running_server, uvicorn_command

from policy_server.errors import PolicyFailure
from policy_server.executors.local import LocalExecutor
from policy_server.loading import load_policy, load_policy_spec
from policy_server.policy import Decisions, Distributions, Kind, Policy, Result, Task

POISON_ABOVE = 3.5  # mouse_row, the first input: the schema allows 0 to 4
POISONED_MOUSE = (4, 2)  # a mouse on row 4: within the schema, fatal to the model
CLIENTS, REQUESTS_PER_CLIENT = 16, 25


class PoisonablePolicy(torch.nn.Module):
    """A small linear policy for the mouse_and_cheese schema; subclasses fail on poisoned rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = torch.nn.Linear(6, 4)
        self.poison_above = POISON_ABOVE


class RaisesWhenPoisoned(PoisonablePolicy):
    """Raises when any row's first input is above `poison_above`."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if bool((obs[:, 0] > self.poison_above).any()):
            raise RuntimeError("a poisoned observation")
        return self.linear(obs)


class NanWhenPoisoned(PoisonablePolicy):
    """Gives NaN logits for each row whose first input is above `poison_above`, as it is."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        logits = self.linear(obs)
        return torch.where(obs[:, :1] > self.poison_above, torch.full_like(logits, float("nan")), logits)


def raising_policy_dir(make_policy_dir: MakePolicyDir) -> Path:
    """A mouse_and_cheese policy folder whose TorchScript model raises on a poisoned observation."""
    return make_policy_dir(MOUSE_SCHEMA, RaisesWhenPoisoned(), 6, "model.pt")


def poisoned_load(url: str, poisoned_client: int) -> tuple[list[int], list[httpx.Response]]:
    """CLIENTS clients at once, REQUESTS_PER_CLIENT /predict each; client `poisoned_client` sends
    the poisoned observation, the others good ones. The good statuses, and the poisoned answers."""
    good: list[int] = []
    poisoned: list[httpx.Response] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        rng = np.random.default_rng(number)
        with httpx.Client(base_url=url, timeout=60.0, headers=AUTH) as http:
            for _ in range(REQUESTS_PER_CLIENT):
                row, col, cheese_row, cheese_col = (int(v) for v in rng.integers(0, 4, size=4))
                mouse = POISONED_MOUSE if number == poisoned_client else (row, col)
                response = http.post("/predict", json=mouse_observation(mouse, (cheese_row, cheese_col)))
                with lock:
                    if number == poisoned_client:
                        poisoned.append(response)
                    else:
                        good.append(response.status_code)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return good, poisoned


def error_id_of(response: httpx.Response) -> str:
    """The error id a 500 names in its detail."""
    found = re.search(r"error id ([0-9a-f]{12})", response.json()["detail"])
    assert found is not None, response.text
    return found.group(1)


def _tasks(count: int, poisoned: set[int]) -> list[Task]:
    """Tasks of 1 to 3 rows; in a poisoned task one row (not always the first) is poisoned."""
    rng = np.random.default_rng(0)
    tasks = []
    for i in range(count):
        rows = rng.uniform(0, 3, size=(1 + i % 3, 6)).astype(np.float32)
        if i in poisoned:
            rows[-1, 0] = 4.0
        kind = (Kind.DETERMINISTIC, Kind.DISTRIBUTION, Kind.SAMPLE)[i % 3]
        tasks.append(Task(rows, kind, seed=i if kind is Kind.SAMPLE else None))
    return tasks


def _alone(policy: Policy, task: Task) -> Result:
    (result,) = policy.run([task])
    return result


def _assert_same(result: Result | BaseException, expected: Result) -> None:
    """The same actions, the same probabilities up to float32 rounding (a batch sums in another order)."""

    def numbers(result: Result | BaseException) -> tuple[object, list[float | None]]:
        if isinstance(result, Decisions):
            return result.actions, result.probabilities
        assert isinstance(result, Distributions), result
        return None, [p for row in result.rows for head in row for p in head["probabilities"]]

    (actions, probabilities), (expected_actions, expected_probabilities) = numbers(result), numbers(expected)
    assert actions == expected_actions
    assert probabilities == pytest.approx(expected_probabilities, rel=1e-5)


@pytest.fixture(params=[60_000.0, 0.0], ids=["inline", "on-worker"])
def budget_ms(request: pytest.FixtureRequest) -> float:
    return float(request.param)


def _run_all(policy: Policy, tasks: list[Task], budget_ms: float) -> tuple[list[Result | BaseException], list[int]]:
    """Every task submitted at once to a local executor: the results, and the rows of each forward pass."""
    passes: list[int] = []
    executor = LocalExecutor(policy, max_batch_size=64, inline_budget_ms=budget_ms, observe_batch=lambda rows, _: passes.append(rows))

    async def scenario() -> list[Result | BaseException]:
        await executor.start()
        passes.clear()  # not the start-up timings
        try:
            return list(await asyncio.gather(*(executor.run(task) for task in tasks), return_exceptions=True))
        finally:
            await executor.stop()

    return asyncio.run(scenario()), passes


@pytest.mark.parametrize("model", [RaisesWhenPoisoned, NanWhenPoisoned], ids=["raises.pt", "nan.pt2"])
def test_only_the_poisoned_tasks_of_a_batch_fail(
    make_policy_dir: MakePolicyDir, budget_ms: float, model: type[PoisonablePolicy], caplog: pytest.LogCaptureFixture
) -> None:
    """48 tasks coalesced, 4 of them poisoned: exactly those 4 fail, each under its own logged error
    id; every other task gets what it would have got alone."""
    caplog.set_level(logging.WARNING, logger="policy_server")
    model_name = "model.pt" if model is RaisesWhenPoisoned else "model.pt2"
    folder = make_policy_dir(MOUSE_SCHEMA, model(), 6, model_name)
    policy = load_policy(folder, load_policy_spec(folder))
    poisoned = {5, 17, 18, 40}
    tasks = _tasks(48, poisoned)
    expected = {i: _alone(policy, task) for i, task in enumerate(tasks) if i not in poisoned}

    results, passes = _run_all(policy, tasks, budget_ms)

    failures = {i: result for i, result in enumerate(results) if isinstance(result, BaseException)}
    assert set(failures) == poisoned, failures
    assert all(isinstance(failure, PolicyFailure) for failure in failures.values())
    error_ids = [failure.error_id for failure in failures.values() if isinstance(failure, PolicyFailure)]
    assert len(set(error_ids)) == len(poisoned)  # each failed request has its own error id
    for error_id in error_ids:
        assert any(error_id in record.getMessage() for record in caplog.records), error_id
    for i, want in expected.items():
        _assert_same(results[i], want)
    assert max(passes) > 1  # tasks were coalesced
    good_rows = sum(len(task.rows) for i, task in enumerate(tasks) if i not in poisoned)
    if model is RaisesWhenPoisoned:
        assert sum(passes) == good_rows  # the passes that answered hold every good row once
        assert re.search(r"failed on a batch of \d+ requests \(builtins.RuntimeError: a poisoned observation\)", caplog.text)
        tracebacks = [r for r in caplog.records if r.exc_info is not None]
        assert len(tracebacks) == len(poisoned)  # one per failed request


def test_a_batch_that_fails_whole_gives_each_request_its_own_error(
    make_policy_dir: MakePolicyDir, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="policy_server")
    folder = raising_policy_dir(make_policy_dir)
    policy = load_policy(folder, load_policy_spec(folder))
    tasks = _tasks(10, poisoned=set(range(10)))

    results, passes = _run_all(policy, tasks, budget_ms=60_000.0)

    assert all(isinstance(result, PolicyFailure) for result in results)
    error_ids = {result.error_id for result in results if isinstance(result, PolicyFailure)}
    assert len(error_ids) == 10 and passes == []
    assert len([r for r in caplog.records if r.exc_info is not None]) == 10


def test_under_concurrent_load_only_the_poisoned_client_gets_500s(make_policy_dir: MakePolicyDir) -> None:
    """`uvicorn app:app`, 16 clients at once, one of them poisoned: every good request 200,
    every poisoned one 500 with an error id that the server log holds with its traceback."""
    folder = raising_policy_dir(make_policy_dir)
    port = free_port()
    with running_server(uvicorn_command(port), port, cwd=folder) as server:
        good, poisoned = poisoned_load(server.url, poisoned_client=0)
    assert len(good) == (CLIENTS - 1) * REQUESTS_PER_CLIENT and len(poisoned) == REQUESTS_PER_CLIENT
    assert set(good) == {200}, {status: good.count(status) for status in set(good)}
    assert {response.status_code for response in poisoned} == {500}
    lines = server.log.splitlines()
    for response in poisoned:
        error_id = error_id_of(response)
        (at,) = [i for i, line in enumerate(lines) if error_id in line]
        assert "the policy failed on a request" in lines[at]
        assert lines[at + 1] == "Traceback (most recent call last):"  # its traceback, under its id
    assert server.log.count("Traceback (most recent call last):") == REQUESTS_PER_CLIENT
    assert re.search(r"failed on a batch of (\d+) requests", server.log), "the poisoned requests were never coalesced with others"
