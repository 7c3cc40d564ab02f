"""Backend `ray` against a real local Ray (DESIGN.md §5): one Ray for the whole module, node address
127.0.0.2, two CPUs, no dashboard.

In-process apps (TestClient) check that ray answers exactly as local does; `uvicorn app:app` and
`generate.py serve` subprocesses check start-up, a replica killed under load, SIGTERM drained
under load, and that SIGTERM leaves nothing behind. RayExecutor itself, under load, checks version
switches: a rolling update that fails no request, a refused version, a rolled-back one.
"""

import asyncio
import json
import os
import random
import re
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import ray
import torch
from conftest import (
    AUTH,
    MOUSE_OBSERVATION,
    MOUSE_SCHEMA,
    MakePolicyDir,
    constant_logits,
    mlp,
    mouse_observation,
    save_model,
    settings_for,
)
from experience_support import logging_policy, read_table
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from ray import serve as ray_serve
from ray_support import (
    NODE_IP,
    READY_TIMEOUT_S,
    auth_env,
    descendants,
    non_loopback_connections,
    policy_copy,
    post_until_stopped,
    ray_temp_dir,
    ready_statuses,
    survivors,
    wait_until,
)
from recurrent_support import ENVIRONMENTS, api_key_header, import_recurrent, play_interleaved, train_recurrent
from servers import free_port, running_server, serve_command, sigterm_under_keep_alive_load, uvicorn_command
from test_batch_isolation import CLIENTS, REQUESTS_PER_CLIENT, error_id_of, poisoned_load, raising_policy_dir
from test_metrics import sample_value

from policy_server import loading
from policy_server.errors import ConfigError, InputError
from policy_server.executors.ray import DeploymentFailed, RayExecutor, app_builder
from policy_server.experience.episodes import AgentRef
from policy_server.loading import SCHEMA_FILE, ModelVersion, load_policy_spec, load_version
from policy_server.observations import RowEncoder, observation_model
from policy_server.policy import Decisions, Kind, Policy, Result, Task
from policy_server.server import build_app, choose_backend
from policy_server.settings import Settings

REPLICA_CPUS = 0.5  # the module's Ray has 2 CPUs; up to 4 replicas at once
SEEDS = (0, 1, 2, 12345)
Observation = dict[str, Any]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """A local Ray in this process (its GCS address, for servers that join it); shut down after the module."""
    with ray_temp_dir() as temp_dir, pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", temp_dir)  # also for the servers started from here (servers.clean_env)
        patch.setenv("RAY_AUTH_TOKEN", auth_env()["RAY_AUTH_TOKEN"])
        # Unset, so ray.init turns token auth on itself: it sets RAY_AUTH_MODE=token (inherited by the
        # servers started from here) and reloads its config, read once at import.
        patch.delenv("RAY_AUTH_MODE", raising=False)
        # Serve gives a version whose replicas fail to start 3 tries per replica: 1 is enough here.
        patch.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
        context = ray.init(
            _node_ip_address=NODE_IP,
            include_dashboard=False,
            num_cpus=2,
            _metrics_export_port=free_port(),
            log_to_driver=False,
        )
        try:
            yield context.address_info["gcs_address"]
        finally:
            ray_processes = descendants(os.getpid())
            ray_serve.shutdown()
            ray.shutdown(wait_for_processes=True)
            os.environ.pop("RAY_AUTH_MODE", None)
            left = survivors(ray_processes, timeout_s=30)
    assert left == [], f"Ray processes left running: {left}"


def _wait_ready(client: TestClient) -> None:
    wait_until(lambda: client.get("/ready").status_code == 200, READY_TIMEOUT_S, "the deployment answers")


def _ray_settings(**overrides: object) -> dict[str, object]:
    return {"backend": "ray", "ray_node_ip": NODE_IP, "ray_replica_cpus": REPLICA_CPUS} | overrides


@pytest.fixture(scope="module")
def clients(local_ray: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[TestClient, TestClient]]]:
    """Per example: (its app with backend local, its app with backend ray), both started."""
    destination = tmp_path_factory.mktemp("ray-apps")
    with ExitStack() as stack:
        pairs = {}
        for example in ("mouse_and_cheese", "tuple_masking"):
            folder = policy_copy(example, destination, example)
            local = stack.enter_context(TestClient(build_app(settings_for(folder)), raise_server_exceptions=False))
            remote = stack.enter_context(TestClient(build_app(settings_for(folder, **_ray_settings())), raise_server_exceptions=False))
            pairs[example] = (local, remote)
        for _, remote in pairs.values():
            _wait_ready(remote)
        yield pairs


def _mouse_observations(rng: random.Random) -> list[Observation]:
    cells = [((rng.randint(0, 5), rng.randint(0, 5)), (rng.randint(0, 5), rng.randint(0, 5))) for _ in range(6)]
    return [mouse_observation(mouse, cheese) for mouse, cheese in cells]


def _tuple_observations(rng: random.Random) -> list[Observation]:
    observations = []
    for _ in range(6):
        mask = [rng.random() < 0.5 for _ in range(5)]
        mask[rng.randrange(2)] = mask[2 + rng.randrange(3)] = True  # each head allows an action
        observations.append(
            {
                "queue_lengths": [rng.uniform(0, 10), rng.uniform(0, 10)],
                "job_size": rng.uniform(0.5, 1.5),
                "urgency": rng.random(),
                "energy_price": rng.random(),
                "actionMask": mask,
            }
        )
    return observations


def _pendulum_observations(rng: random.Random) -> list[Observation]:
    return [{"cos_theta": rng.uniform(-1, 1), "sin_theta": rng.uniform(-1, 1), "theta_dot": rng.uniform(-8, 8)} for _ in range(6)]


OBSERVATIONS: dict[str, Callable[[random.Random], list[Observation]]] = {
    "mouse_and_cheese": _mouse_observations,
    "tuple_masking": _tuple_observations,
    "pendulum": _pendulum_observations,
}


def _answers(client: TestClient, observations: list[Observation]) -> list[tuple[str, int, Any]]:
    """Every prediction route for every observation (sampling with each seed), and the batch route."""

    def ask(path: str, body: Any) -> tuple[str, int, Any]:
        response = client.post(path, json=body, headers=AUTH)
        return path, response.status_code, response.json()

    answers = []
    for observation in observations:
        answers += [ask(f"/predict?seed={seed}", observation) for seed in SEEDS]
        answers += [ask("/predict_deterministic", observation), ask("/distribution", observation)]
    answers += [ask(f"/predict_batch?seed={seed}", {"observations": observations}) for seed in SEEDS]
    answers.append(ask("/predict_batch?deterministic=true", {"observations": observations}))
    return answers


@pytest.mark.parametrize("example", ["mouse_and_cheese", "tuple_masking"])
def test_ray_answers_exactly_as_local(clients: dict[str, tuple[TestClient, TestClient]], example: str) -> None:
    local, remote = clients[example]
    observations = OBSERVATIONS[example](random.Random(example))
    expected = _answers(local, observations)
    assert {status for _, status, _ in expected} == {200}
    assert _answers(remote, observations) == expected


def _oip_inputs(observations: list[Observation]) -> list[dict[str, Any]]:
    """The observations as OIP tensors, one per field."""
    inputs = []
    for name, first in observations[0].items():
        values = [observation[name] for observation in observations]
        shape = [len(values), len(first)] if isinstance(first, list) else [len(values)]
        kind = first[0] if isinstance(first, list) else first
        inputs.append({"name": name, "shape": shape, "datatype": "BOOL" if isinstance(kind, bool) else "FP32", "data": values})
    return inputs


@pytest.mark.parametrize("example", ["mouse_and_cheese", "tuple_masking"])
def test_ray_answers_oip_exactly_as_local(clients: dict[str, tuple[TestClient, TestClient]], example: str) -> None:
    local, remote = clients[example]
    inputs = _oip_inputs(OBSERVATIONS[example](random.Random(example)))
    outputs = [{"name": output["name"]} for output in local.get(f"/v2/models/{example}", headers=AUTH).json()["outputs"]]
    bodies = [{"inputs": inputs, "parameters": {"seed": seed}, "outputs": outputs} for seed in SEEDS]
    bodies.append({"inputs": inputs, "parameters": {"deterministic": True}})

    def answers(client: TestClient) -> list[tuple[int, Any]]:
        return [(r.status_code, r.json()) for r in (client.post(f"/v2/models/{example}/infer", json=b, headers=AUTH) for b in bodies)]

    expected = answers(local)
    assert {status for status, _ in expected} == {200}
    assert answers(remote) == expected


def test_input_errors_cross_from_the_replicas_as_they_are(clients: dict[str, tuple[TestClient, TestClient]]) -> None:
    """Nothing allowed for a head: the replica's InputError is the same 422 as local's."""
    local, remote = clients["tuple_masking"]
    blocked = _tuple_observations(random.Random(0))[0] | {"actionMask": [False, False, True, True, True]}
    for path, body in (("/predict", blocked), ("/predict_batch", {"observations": [blocked, blocked]})):
        expected = local.post(path, json=body, headers=AUTH)
        answer = remote.post(path, json=body, headers=AUTH)
        assert expected.status_code == answer.status_code == 422
        assert answer.json() == expected.json()


def test_info_shows_backend_replicas_and_device(clients: dict[str, tuple[TestClient, TestClient]]) -> None:
    local, remote = clients["mouse_and_cheese"]
    info = remote.get("/info", headers=AUTH).json()
    assert (info["backend"], info["replicas"], info["device"], info["gpu_memory"], info["ready"]) == ("ray", 1, "cpu", None, True)
    (replica,) = info["replica_details"]
    assert replica["device"] == "cpu" and replica["gpu_memory"] is None
    assert psutil.Process(replica["pid"]) in descendants(os.getpid())  # a process of this module's Ray
    assert replica["node_id"] == ray.get_runtime_context().get_node_id()
    described = local.get("/info", headers=AUTH).json()
    for key in ("model", "format", "sha256", "input_size", "heads"):
        assert info[key] == described[key], key


def test_replicas_batch_concurrent_requests_and_report_them(clients: dict[str, tuple[TestClient, TestClient]]) -> None:
    """Concurrent requests share forward passes; the replicas' batch sizes reach the app's /metrics."""
    _, remote = clients["mouse_and_cheese"]

    def batches() -> tuple[float, float]:
        text = remote.get("/metrics").text
        return sample_value(text, "policy_server_batch_size_count"), sample_value(text, "policy_server_batch_size_sum")

    count, rows = batches()
    observation = _mouse_observations(random.Random(0))[0]
    requests = 64
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: remote.post("/predict", json=observation, headers=AUTH).status_code, range(requests)))
    assert statuses == [200] * requests
    new_count, new_rows = batches()
    assert new_rows - rows == requests  # every row counted once
    assert new_count - count < requests  # and some forward passes served several requests


def test_the_model_is_loaded_only_in_the_replicas(local_ray: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With backend ray this process builds no Policy and loads no model file; continuous heads too."""
    folder = policy_copy("pendulum", tmp_path, "pendulum")
    observations = _pendulum_observations(random.Random(3))
    with TestClient(build_app(settings_for(folder))) as local:
        expected = _answers(local, observations)
    loads: list[object] = []
    real_init, real_load = Policy.__init__, loading.load_runtime

    def policy_spy(self: Policy, *args: Any, **kwargs: Any) -> None:
        loads.append(args)
        real_init(self, *args, **kwargs)

    def runtime_spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Policy, "__init__", policy_spy)
    monkeypatch.setattr(loading, "load_runtime", runtime_spy)
    with TestClient(build_app(settings_for(folder, **_ray_settings()))) as remote:
        _wait_ready(remote)
        assert _answers(remote, observations) == expected
        assert remote.get("/info", headers=AUTH).json()["backend"] == "ray"
    assert loads == []
    assert "pendulum" not in ray_serve.status().applications  # stop() deleted its application


def test_an_application_from_a_serve_config_is_used_and_left_running(
    local_ray: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a KubeRay RayService does (deploy/kuberay-rayservice.yaml): Serve builds the application
    with app_builder; the server finds it by the schema's name, uses it, and does not delete it. Nor
    does it switch its version: that is the Serve config's to say."""
    folder = policy_copy("mouse_and_cheese", tmp_path, "declared")
    monkeypatch.setenv("POLICY_SERVER_RAY_REPLICA_CPUS", str(REPLICA_CPUS))
    ray_serve.run(app_builder({"policy_dir": str(folder)}), name="declared", route_prefix=None)
    observations = _mouse_observations(random.Random(5))
    try:
        with TestClient(build_app(settings_for(folder))) as local:
            expected = _answers(local, observations)
        with TestClient(build_app(settings_for(folder, **_ray_settings()))) as remote:
            _wait_ready(remote)
            assert _answers(remote, observations) == expected
        with pytest.raises(ConfigError, match="'declared' was deployed from a Serve config file, not by this server"):
            asyncio.run(_switch_once_started(RayExecutor(ModelVersion.of_folder(folder, load_policy_spec(folder)), settings_for(folder))))
        assert ray_serve.status().applications["declared"].status == "RUNNING"
    finally:
        ray_serve.delete("declared")


async def _switch_once_started(executor: RayExecutor) -> None:
    """Start `executor`, switch it to the version it runs, stop it."""
    await executor.start()
    try:
        await executor.switch(executor.version)
    finally:
        await executor.stop()


def test_the_backend_comes_from_the_environment_then_ray_address_then_the_schema(make_policy_dir: MakePolicyDir) -> None:
    spec = load_policy_spec(make_policy_dir(MOUSE_SCHEMA + "serving: {backend: ray}\n", mlp(6, 4), 6))
    local_spec = replace(spec, serving=replace(spec.serving, backend="local"))
    folder = spec.path.parent
    assert choose_backend(spec, Settings(folder)) == "ray"
    assert choose_backend(local_spec, Settings(folder)) == "local"
    assert choose_backend(local_spec, Settings(folder, ray_address="10.0.0.1:6379")) == "ray"
    assert choose_backend(spec, Settings(folder, backend="local", ray_address="10.0.0.1:6379")) == "local"
    with pytest.raises(ConfigError, match="POLICY_SERVER_BACKEND: unknown backend 'kubernetes'; fix: use one of local, ray"):
        choose_backend(spec, Settings(folder, backend="kubernetes"))


def test_ray_settings_from_the_environment(tmp_path: Path) -> None:
    defaults = Settings.from_env({"POLICY_SERVER_DIR": str(tmp_path)})
    assert (defaults.ray_address, defaults.ray_node_ip, defaults.ray_metrics_port, defaults.ray_cpus, defaults.ray_replica_cpus) == (
        None,
        None,
        8080,
        None,
        1.0,
    )
    env = {
        "RAY_ADDRESS": "10.0.0.1:6379",
        "POLICY_SERVER_RAY_NODE_IP": NODE_IP,
        "POLICY_SERVER_RAY_METRICS_PORT": "9100",
        "POLICY_SERVER_RAY_CPUS": "3",
        "POLICY_SERVER_RAY_REPLICA_CPUS": "0.25",
    }
    settings = Settings.from_env(env)
    assert (settings.ray_address, settings.ray_node_ip, settings.ray_metrics_port, settings.ray_cpus, settings.ray_replica_cpus) == (
        "10.0.0.1:6379",
        NODE_IP,
        9100,
        3,
        0.25,
    )
    for name, value in (
        ("POLICY_SERVER_RAY_REPLICA_CPUS", "none"),
        ("POLICY_SERVER_RAY_REPLICA_CPUS", "-1"),
        ("POLICY_SERVER_RAY_CPUS", "0"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


def test_ray_connections_stay_on_loopback(clients: dict[str, tuple[TestClient, TestClient]]) -> None:
    """While Ray runs and answers: no connection of this process or its Ray goes outside 127.0.0.0/8."""
    for _, remote in clients.values():
        assert remote.post("/predict_raw", json={"obs": [0.0] * 6}, headers=AUTH).status_code in (200, 422)
    processes = [psutil.Process(), *descendants(os.getpid())]
    assert any(process.name() == "raylet" for process in processes)
    assert non_loopback_connections(processes) == []


def _slow_mouse_model() -> torch.nn.Module:
    """The mouse schema's sizes, made slow on purpose: a batch of 256 rows takes tens of milliseconds,
    so a request is almost always on the replica when it is killed."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 4)
    )


def test_a_killed_replica_loses_no_request(local_ray: str, make_policy_dir: MakePolicyDir) -> None:
    """`uvicorn app:app` joined to the module's Ray via RAY_ADDRESS: SIGKILL its replica while three
    clients keep requests in flight (with one, the kill could land between two requests, and then
    nothing needs resending); Serve replaces the replica, the requests it had are sent again,
    every request gets a 200. On SIGTERM the server deletes its application and leaves the Ray it
    joined running."""
    folder = make_policy_dir(MOUSE_SCHEMA, _slow_mouse_model(), 6)
    port = free_port()
    env = {"RAY_ADDRESS": local_ray, "POLICY_SERVER_RAY_NODE_IP": NODE_IP, "POLICY_SERVER_RAY_REPLICA_CPUS": str(REPLICA_CPUS)}
    batch = {"observations": [MOUSE_OBSERVATION] * 256}
    outcomes: list[int | str] = []
    stop = threading.Event()

    with running_server(uvicorn_command(port), port, cwd=folder, env=env, ready_path="/health") as server:
        ready_statuses(server.url)
        (victim_pid,) = _replica_pids(server.url)
        victim = psutil.Process(victim_pid)
        assert victim in descendants(os.getpid())  # the module's Ray runs it: ours to kill
        loads = [
            threading.Thread(target=post_until_stopped, args=(server.url, "/predict_batch", batch, AUTH, stop, outcomes)) for _ in range(3)
        ]
        for load in loads:
            load.start()
        try:
            wait_until(lambda: len(outcomes) >= 5, 60, "answers before the kill")
            victim.send_signal(signal.SIGKILL)
            at_kill = len(outcomes)
            wait_until(lambda: len(outcomes) >= at_kill + 10, 120, "answers after the kill")
        finally:
            stop.set()
            for load in loads:
                load.join()
        wait_until(lambda: _replica_pids(server.url) not in ([], [victim_pid]), 60, "/info shows the new replica")
    assert outcomes == [200] * len(outcomes)
    assert "a replica died with a call of 1 request(s) in flight" in server.log
    assert server.returncode in (0, -signal.SIGTERM), server.log
    assert ray.is_initialized() and folder.name not in ray_serve.status().applications


# Coalescing (DESIGN.md §5): concurrent tasks leave this process as one handle call.
COALESCED_TASKS = 24  # within max_batch_size (64) rows: one call
KILLS_AT_MOST = 4


def _tuple_tasks(folder: Path, observations: list[Observation]) -> list[Task]:
    """The tasks the routes would build for these observations, each kind of answer in the mix."""
    spec = load_policy_spec(folder)
    encoder, parse = RowEncoder(spec), TypeAdapter(observation_model(spec)).validate_python
    kinds = (Kind.DETERMINISTIC, Kind.DISTRIBUTION, Kind.SAMPLE)
    return [Task(encoder.encode([parse(o)]), kinds[i % 3], seed=i) for i, o in enumerate(observations)]


def _comparable(result: Result | BaseException) -> object:
    """An InputError by its 422 detail (exceptions compare by identity), anything else as it is."""
    return result.as_detail() if isinstance(result, InputError) else result


def _calls_and_rows(executor: RayExecutor) -> tuple[int, int]:
    (replica,) = executor.describe()["replica_details"]
    return replica["calls_answered"], replica["rows_answered"]


def test_concurrent_tasks_reach_the_replica_in_one_handle_call_each_answered_alone(local_ray: str, tmp_path: Path) -> None:
    """24 tasks submitted at once reach the replica as ONE handle call and one forward pass; each
    gets exactly the result local computes for it alone. Then the same with one task whose action
    mask allows nothing: still one call, that task alone gets its InputError (a 422), the others
    their results."""
    folder = policy_copy("tuple_masking", tmp_path, "coalesced")
    version = ModelVersion.of_folder(folder, load_policy_spec(folder))
    observations = (_tuple_observations(random.Random(1)) * 4)[:COALESCED_TASKS]
    blocked = observations[0] | {"actionMask": [False, False, True, True, True]}
    rounds = {"good": _tuple_tasks(folder, observations), "one bad": _tuple_tasks(folder, [*observations[:5], blocked, *observations[6:]])}
    local = load_version(version)
    passes: list[tuple[int, float]] = []

    async def scenario() -> dict[str, tuple[list[Result | BaseException], tuple[int, int], tuple[int, int]]]:
        executor = RayExecutor(version, settings_for(folder, **_ray_settings()), lambda rows, seconds: passes.append((rows, seconds)))
        await executor.start()
        outcomes = {}
        try:
            for name, tasks in rounds.items():
                before = _calls_and_rows(executor)
                results = await asyncio.gather(*(executor.run(task) for task in tasks), return_exceptions=True)
                await executor._describe_replicas()
                outcomes[name] = (results, before, _calls_and_rows(executor))
        finally:
            await executor.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    for name, tasks in rounds.items():
        results, (calls_before, rows_before), (calls_after, rows_after) = outcomes[name]
        assert (calls_after - calls_before, rows_after - rows_before) == (1, COALESCED_TASKS), name
        expected = local.run(tasks)  # one forward pass of the same rows, as the replica's
        assert [_comparable(result) for result in results] == [_comparable(result) for result in expected], name
    errors = [i for i, result in enumerate(outcomes["one bad"][0]) if isinstance(result, BaseException)]
    assert errors == [5] and isinstance(outcomes["one bad"][0][5], InputError)
    assert [rows for rows, _ in passes] == [COALESCED_TASKS, COALESCED_TASKS]  # one forward pass per call, counted once


def test_a_replica_killed_with_a_coalesced_call_in_flight_loses_no_request(local_ray: str, make_policy_dir: MakePolicyDir) -> None:
    """`uvicorn app:app` joined to the module's Ray, 16 clients sending one observation each in a
    loop, so handle calls of several requests are always in flight; SIGKILL the replica: the call it
    had is sent again whole, to the replica Serve starts instead, and every request gets a 200."""
    folder = make_policy_dir(MOUSE_SCHEMA, _slow_mouse_model(), 6)
    port = free_port()
    env = {"RAY_ADDRESS": local_ray, "POLICY_SERVER_RAY_NODE_IP": NODE_IP, "POLICY_SERVER_RAY_REPLICA_CPUS": str(REPLICA_CPUS)}
    outcomes: list[int | str] = []
    stop = threading.Event()

    def resent(log: str) -> list[int]:
        return [int(n) for n in re.findall(r"a replica died with a call of (\d+) request\(s\) in flight", log)]

    with running_server(uvicorn_command(port), port, cwd=folder, env=env, ready_path="/health") as server:
        ready_statuses(server.url)
        clients = [
            threading.Thread(target=post_until_stopped, args=(server.url, "/predict", MOUSE_OBSERVATION, AUTH, stop, outcomes))
            for _ in range(16)
        ]
        for thread in clients:
            thread.start()
        try:
            wait_until(lambda: len(outcomes) >= 100, 60, "answers before the kill")
            # The calls in flight hold a few requests each; should the killed ones hold one each, kill again.
            for _ in range(KILLS_AT_MOST):
                (victim_pid,) = _replica_pids(server.url)
                victim = psutil.Process(victim_pid)
                assert victim in descendants(os.getpid())  # the module's Ray runs it: ours to kill
                victim.send_signal(signal.SIGKILL)
                at_kill = len(outcomes)
                wait_until(lambda at_kill=at_kill: len(outcomes) >= at_kill + 100, 120, "answers after the kill")
                wait_until(lambda pid=victim_pid: _replica_pids(server.url) not in ([], [pid]), 60, "/info shows the new replica")
                if max(resent(server.log), default=0) > 1:
                    break
        finally:
            stop.set()
            for thread in clients:
                thread.join()
    assert outcomes == [200] * len(outcomes)
    assert max(resent(server.log), default=0) > 1, server.log  # a call of several requests was in flight, and sent again


def test_sigterm_drains_keep_alive_clients_then_deletes_the_application(local_ray: str, mouse_dir: Path) -> None:
    """`generate.py serve` joined to the module's Ray, 8 keep-alive clients in a loop, SIGTERM: as
    with backend local, no request is dropped (each is answered, or refused once the port closed),
    /ready turns 503 on an open connection, and the process ends; having answered everything, the
    server deletes its application and leaves the Ray it joined running."""
    application, clients = load_policy_spec(mouse_dir).name, 8
    port = free_port()
    env = {
        "RAY_ADDRESS": local_ray,
        "POLICY_SERVER_RAY_NODE_IP": NODE_IP,
        "POLICY_SERVER_RAY_REPLICA_CPUS": str(REPLICA_CPUS),
        "POLICY_SERVER_DRAIN_SECONDS": "3",
    }
    with running_server(serve_command(mouse_dir, port), port, cwd=mouse_dir, env=env, ready_path="/health") as server:
        ready_statuses(server.url)
        assert ray_serve.status().applications[application].status == "RUNNING"
        body = json.dumps(MOUSE_OBSERVATION).encode()
        drained = sigterm_under_keep_alive_load(server.process, server.url, "/predict", body, AUTH, clients=clients)
    assert not drained.dropped, (drained.outcomes, server.log)
    assert set(drained.outcomes) <= {"answered 200", "answered 200 after SIGTERM", "refused"}, drained.outcomes
    assert drained.outcomes["answered 200 after SIGTERM"] > 0  # the drain served the open connections
    assert drained.outcomes["refused"] == clients  # each client's connection closed after an answer, then the port
    assert drained.ready == ("answered 200", "answered 503")
    assert drained.new_connection == "refused"
    assert drained.returncode in (0, -signal.SIGTERM), server.log
    assert "SIGTERM: draining" in server.log  # our handler got it: Ray, started after, did not take it
    assert "Application shutdown complete" in server.log and "Traceback" not in server.log
    assert ray.is_initialized() and application not in ray_serve.status().applications


def test_a_poisoned_request_fails_alone_on_the_replica(local_ray: str, make_policy_dir: MakePolicyDir) -> None:
    """`uvicorn app:app` joined to the module's Ray, 16 clients at once, one sending an observation
    the model raises on: the replica halves each batch that fails, so every good request gets a 200
    and every poisoned one a 500 whose error id the replica logged with the traceback."""
    folder = raising_policy_dir(make_policy_dir)
    port = free_port()
    env = {"RAY_ADDRESS": local_ray, "POLICY_SERVER_RAY_NODE_IP": NODE_IP, "POLICY_SERVER_RAY_REPLICA_CPUS": str(REPLICA_CPUS)}
    with running_server(uvicorn_command(port), port, cwd=folder, env=env, ready_path="/health") as server:
        ready_statuses(server.url)
        good, poisoned = poisoned_load(server.url, poisoned_client=3)
        error_ids = [error_id_of(response) for response in poisoned]
        wait_until(lambda: all(error_id in _ray_logs() for error_id in error_ids), 60, "the replica logged every error id")
    assert len(good) == (CLIENTS - 1) * REQUESTS_PER_CLIENT and len(poisoned) == REQUESTS_PER_CLIENT
    assert set(good) == {200}, {status: good.count(status) for status in set(good)}
    assert {response.status_code for response in poisoned} == {500} and len(set(error_ids)) == len(error_ids)
    logs = _ray_logs()
    for error_id in error_ids:
        assert re.search(rf"the policy failed on a request \(error id {error_id}\)\s*\nTraceback \(most recent call last\):", logs)
    assert re.search(r"failed on a batch of \d+ requests", logs), "the poisoned requests were never batched with others"


def _ray_logs() -> str:
    """Every log file of the module's Ray sessions, replicas' included."""
    files = Path(os.environ["RAY_TMPDIR"]).glob("**/logs/**/*")
    return "\n".join(path.read_text(errors="replace") for path in files if path.is_file() and path.suffix in (".log", ".err", ".out"))


def test_uvicorn_starts_and_stops_its_own_ray(tmp_path: Path) -> None:
    """No RAY_ADDRESS: the server starts a local Ray. /ready is 503 until the deployment answers,
    then one "Finished loading" line; Ray's metrics on their port; SIGTERM leaves no Ray process."""
    folder = policy_copy("tuple_masking", tmp_path, "own_ray")
    port, metrics_port = free_port(), free_port()
    env = {
        "POLICY_SERVER_BACKEND": "ray",
        "POLICY_SERVER_RAY_NODE_IP": NODE_IP,
        "POLICY_SERVER_RAY_CPUS": "1",
        "POLICY_SERVER_RAY_METRICS_PORT": str(metrics_port),
        "POLICY_SERVER_RAY_REPLICA_CPUS": str(REPLICA_CPUS),
    }
    with (
        ray_temp_dir() as temp_dir,
        running_server(uvicorn_command(port), port, cwd=folder, env=env | {"RAY_TMPDIR": temp_dir}, ready_path="/health") as server,
    ):
        readiness = ready_statuses(server.url)
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            info = client.get("/info", headers=AUTH).json()
            assert (info["backend"], info["replicas"], info["device"]) == ("ray", 1, "cpu")
            ray_processes = descendants(server.process.pid)
            names = {process.name() for process in ray_processes}
            assert {"raylet", "gcs_server"} <= names
            assert psutil.Process(info["replica_details"][0]["pid"]) in ray_processes
        wait_until(lambda: "ray_" in _text(f"http://{NODE_IP}:{metrics_port}/metrics"), 60, "Ray's metrics on their port")
        assert non_loopback_connections([psutil.Process(server.process.pid), *ray_processes]) == []
    assert readiness[0] == 503 and readiness[-1] == 200
    assert server.returncode in (0, -signal.SIGTERM), server.log
    assert "Finished loading own_ray version 1: model.pt2 (torch.export) with backend ray, 1 replica(s), on cpu" in server.log
    assert server.log.count("Finished loading") == 1
    assert "Application shutdown complete" in server.log and "Traceback" not in server.log
    assert survivors(ray_processes, timeout_s=30) == []


def test_workers_share_one_ray_and_one_application(tmp_path: Path) -> None:
    """`generate.py serve --workers 2` with backend ray and no RAY_ADDRESS: the supervisor starts one
    Ray, both workers answer (each counts requests under its own pid) from the one replica of one
    application; SIGTERM ends the workers, then Ray: nothing is left running."""
    folder = policy_copy("mouse_and_cheese", tmp_path, "shared_workers")
    port, counters = free_port(), tmp_path / "prometheus"
    counters.mkdir()
    env = {
        "POLICY_SERVER_BACKEND": "ray",
        "POLICY_SERVER_RAY_NODE_IP": NODE_IP,
        "POLICY_SERVER_RAY_CPUS": "1",
        "POLICY_SERVER_RAY_METRICS_PORT": str(free_port()),
        "POLICY_SERVER_RAY_REPLICA_CPUS": str(REPLICA_CPUS),
        "PROMETHEUS_MULTIPROC_DIR": str(counters),
    }
    command = [*serve_command(folder, port), "--workers", "2"]
    with (
        ray_temp_dir() as temp_dir,
        running_server(command, port, cwd=folder, env=env | {"RAY_TMPDIR": temp_dir}, ready_path="/health") as server,
    ):
        # a new connection each time, so both workers are asked
        wait_until(lambda: all(_status(f"{server.url}/ready") == 200 for _ in range(10)), READY_TIMEOUT_S, "both workers ready")
        statuses = [httpx.post(f"{server.url}/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code for _ in range(40)]
        replica_pids = {pid for _ in range(10) for pid in _replica_pids(server.url)}
        processes = descendants(server.process.pid)
        workers = {process.pid for process in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(process.cmdline())}
        replicas = [process for process in processes if "ServeReplica" in " ".join(process.cmdline())]
        gcs_servers = [process for process in processes if process.name() == "gcs_server"]
    assert statuses == [200] * 40
    answered_by = {int(path.stem.rsplit("_", 1)[-1]) for path in counters.glob("counter_*.db")}
    assert len(workers) == 2 and answered_by >= workers, (answered_by, workers)  # the supervisor may count too
    assert len(gcs_servers) == 1 and len(replicas) == 1  # one Ray, one replica of one application
    assert replica_pids == {replicas[0].pid}
    assert server.returncode in (0, -signal.SIGTERM), server.log
    assert "Traceback" not in server.log
    assert survivors(processes, timeout_s=30) == []


def _status(url: str) -> int:
    return httpx.get(url, timeout=30.0).status_code


def _replica_pids(url: str) -> list[int]:
    return [replica["pid"] for replica in httpx.get(f"{url}/info", headers=AUTH).json()["replica_details"]]


def _text(url: str) -> str:
    try:
        return httpx.get(url, timeout=10.0).text
    except httpx.HTTPError as exc:
        return repr(exc)


# A version switch under load (DESIGN.md §10): a policy with two replicas, whose versions answer
# differently, and a version whose model does not fit the schema.
SWITCHING_SCHEMA = MOUSE_SCHEMA + "name: switching\nserving: {replicas: 2}\n"
SWITCH_REPLICA_CPUS = 0.25  # two replicas, one more while they roll, and the check: beside the module's apps
SWITCH_CLIENTS = 8
REQUESTS_PER_SWITCH_CLIENT = 5000  # a bound far above what a switch takes
ANSWERS_AFTER_SWITCH = 5  # per client, sent after switch() returned
PAUSE_BETWEEN_REQUESTS_S = 0.05  # a steady load that leaves the two cores room to start replicas
RUNNING_SAMPLED_EVERY_S = 0.2  # a replica starts in seconds: a dip in running replicas is seen
DETERMINISTIC_TASK = Task(np.array([list(MOUSE_OBSERVATION.values())], dtype=np.float32), Kind.DETERMINISTIC)
Outcome = tuple[str, Result | str]  # when it was sent (before, during or after the switch), and the result or the error


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelVersion]:
    """One policy folder, models/1 and models/2 always choosing action 0 and 3, models/3 taking 5 values where the schema gives 6."""
    folder = tmp_path_factory.mktemp("versions") / "switching"
    folder.mkdir()
    (folder / SCHEMA_FILE).write_text(SWITCHING_SCHEMA)
    spec = load_policy_spec(folder)
    models = {"1": (6, [4.0, 0.0, 0.0, 0.0]), "2": (6, [0.0, 0.0, 0.0, 4.0]), "3": (5, [4.0, 0.0, 0.0, 0.0])}
    return {
        label: ModelVersion(folder, spec, save_model(constant_logits(size, logits), folder / "models" / label / "model.pt2", size), label)
        for label, (size, logits) in models.items()
    }


def _switching_executor(versions: dict[str, ModelVersion]) -> RayExecutor:
    settings = settings_for(versions["1"].folder, **_ray_settings(ray_replica_cpus=SWITCH_REPLICA_CPUS))
    return RayExecutor(versions["1"], settings)


async def _under_load(executor: RayExecutor, action: Awaitable[None], outcomes: list[Outcome], running: list[int]) -> None:
    """`action` while SWITCH_CLIENTS clients send DETERMINISTIC_TASK in a loop: it starts once the
    clients had answers, and each client stops once it had ANSWERS_AFTER_SWITCH sent after it.
    Meanwhile, Serve's count of RUNNING replicas is sampled into `running`."""
    phase = ["before"]

    async def sample_running() -> None:
        while phase[0] == "during":
            running.append(await asyncio.to_thread(_running_replicas, executor.app_name))
            await asyncio.sleep(RUNNING_SAMPLED_EVERY_S)

    async def client() -> None:
        after = 0
        for _ in range(REQUESTS_PER_SWITCH_CLIENT):
            sent = phase[0]
            try:
                outcomes.append((sent, await executor.run(DETERMINISTIC_TASK)))
            except Exception as exc:
                outcomes.append((sent, repr(exc)))
            after += sent == "after"
            await asyncio.sleep(PAUSE_BETWEEN_REQUESTS_S)
            if after == ANSWERS_AFTER_SWITCH:
                return

    clients = [asyncio.create_task(client()) for _ in range(SWITCH_CLIENTS)]
    try:
        for _ in range(600):  # 30 s at most
            if len(outcomes) >= SWITCH_CLIENTS:
                break
            await asyncio.sleep(0.05)
        phase[0] = "during"
        sampler = asyncio.create_task(sample_running())
        await action
    finally:
        phase[0] = "after"
        await asyncio.gather(*clients, sampler)


def _running_replicas(application: str) -> int:
    return ray_serve.status().applications[application].deployments["PolicyDeployment"].replica_states.get("RUNNING", 0)


def _failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [outcome for outcome in outcomes if isinstance(outcome[1], str)]


def _versions_answering(outcomes: list[Outcome], sent: str) -> dict[str, int]:
    answers = [result.version for when, result in outcomes if when == sent and isinstance(result, Decisions)]
    return {label: answers.count(label) for label in sorted(set(answers))}


def _expected_answers(versions: dict[str, ModelVersion]) -> dict[str, Result]:
    return {label: load_version(versions[label]).run([DETERMINISTIC_TASK])[0] for label in ("1", "2")}


def test_a_switch_rolls_the_replicas_onto_the_new_version_and_fails_no_request(local_ray: str, versions: dict[str, ModelVersion]) -> None:
    """Two replicas of version 1, eight clients in a loop, switch to version 2: Serve's rolling update
    replaces the replicas while every request gets its answer, from the version that computed it;
    once switch() returned, every answer is version 2's, and both replicas run version 2."""

    running: list[int] = []

    async def scenario() -> tuple[set[int], list[Outcome], dict[str, Any], str]:
        executor = _switching_executor(versions)
        await executor.start()
        try:
            before = {replica["pid"] for replica in executor.describe()["replica_details"]}
            outcomes: list[Outcome] = []
            await _under_load(executor, executor.switch(versions["2"]), outcomes, running)
            return before, outcomes, executor.describe(), ray_serve.status().applications["switching"].status
        finally:
            await executor.stop()

    pids_before, outcomes, described, status = asyncio.run(scenario())
    assert _failures(outcomes) == []
    assert running and min(running) == 2  # new replicas ran before old ones left
    assert set(_versions_answering(outcomes, "before")) == {"1"}
    assert _versions_answering(outcomes, "after") == {"2": SWITCH_CLIENTS * ANSWERS_AFTER_SWITCH}
    expected = _expected_answers(versions)
    assert expected["1"] != expected["2"]
    assert all(result == expected[result.version] for _, result in outcomes)  # type: ignore[union-attr]
    assert status == "RUNNING"
    assert described["version"] == "2" and described["replicas"] == 2
    replicas = described["replica_details"]
    assert [replica["version"] for replica in replicas] == ["2", "2"]
    assert not {replica["pid"] for replica in replicas} & pids_before  # new replicas: the old ones left


def test_a_version_that_does_not_fit_its_schema_is_refused_and_the_old_one_serves_on(
    local_ray: str, versions: dict[str, ModelVersion]
) -> None:
    """Version 3's model takes 5 values where the schema gives 6: switch() raises the loader's own
    ConfigError, found off the replicas; the application is not touched (the same replicas, RUNNING),
    and the clients' requests, during and after, are all answered by version 1."""
    with pytest.raises(ConfigError) as loader_error:
        load_version(versions["3"])

    running: list[int] = []

    async def scenario() -> tuple[set[int], list[Outcome], BaseException | None, set[int], str]:
        executor = _switching_executor(versions)
        await executor.start()
        refusal: BaseException | None = None
        try:
            before = {replica["pid"] for replica in executor.describe()["replica_details"]}
            outcomes: list[Outcome] = []
            try:
                await _under_load(executor, executor.switch(versions["3"]), outcomes, running)
            except ConfigError as error:
                refusal = error
            await executor._describe_replicas()
            after = {replica["pid"] for replica in executor.describe()["replica_details"]}
            return before, outcomes, refusal, after, ray_serve.status().applications["switching"].status
        finally:
            await executor.stop()

    pids_before, outcomes, refusal, pids_after, status = asyncio.run(scenario())
    assert isinstance(refusal, ConfigError) and str(refusal) == str(loader_error.value)
    assert "takes 5 input values but schema.yaml describes 6" in str(refusal)
    assert _failures(outcomes) == []
    assert set(running) <= {2}
    assert set(_versions_answering(outcomes, "during")) <= {"1"}
    assert _versions_answering(outcomes, "after") == {"1": SWITCH_CLIENTS * ANSWERS_AFTER_SWITCH}
    assert status == "RUNNING" and pids_after == pids_before and len(pids_before) == 2


def test_replicas_failing_on_a_version_that_passed_the_check_roll_back_to_the_old_one(
    local_ray: str, versions: dict[str, ModelVersion], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when a version loads in the check but not on the replicas (a GPU out of memory, say): the
    check skipped, version 3's replicas fail until Serve gives the rolling update up. The one old
    replica serves meanwhile, switch() raises with the replicas' error, and the application is
    rolled back: RUNNING on version 1, as every answer was. One replica: Serve gives up sooner."""
    one_replica = {
        label: replace(version, spec=replace(version.spec, serving=replace(version.spec.serving, replicas=1)))
        for label, version in versions.items()
    }

    async def check_passed(version: ModelVersion) -> None:
        pass

    running: list[int] = []

    async def scenario() -> tuple[list[Outcome], BaseException | None, dict[str, Any], str]:
        executor = _switching_executor(one_replica)
        monkeypatch.setattr(executor, "_check_loads", check_passed)
        await executor.start()
        failure: BaseException | None = None
        try:
            outcomes: list[Outcome] = []
            try:
                await _under_load(executor, executor.switch(one_replica["3"]), outcomes, running)
            except DeploymentFailed as error:
                failure = error
            return outcomes, failure, executor.describe(), ray_serve.status().applications["switching"].status
        finally:
            await executor.stop()

    outcomes, failure, described, status = asyncio.run(scenario())
    assert isinstance(failure, DeploymentFailed)
    assert "takes 5 input values but schema.yaml describes 6" in str(failure)
    assert _failures(outcomes) == []
    assert running and min(running) == 1  # the old replica stayed until the new one would have run
    assert set(_versions_answering(outcomes, "during")) == {"1"}
    assert _versions_answering(outcomes, "after") == {"1": SWITCH_CLIENTS * ANSWERS_AFTER_SWITCH}
    assert status == "RUNNING"
    assert described["version"] == "1" and [replica["version"] for replica in described["replica_details"]] == ["1"]


def test_ray_logs_the_same_experience_as_local(local_ray: str, tmp_path: Path) -> None:
    """The decisions' probabilities and log-probabilities come back from the replicas whole: both
    backends write the same steps for the same requests."""
    observations = _tuple_observations(random.Random("experience"))
    logs = {}
    for backend, overrides in (("local", {}), ("ray", _ray_settings())):
        folder = logging_policy("tuple_masking", tmp_path / backend, "{dir: log}")
        with TestClient(build_app(settings_for(folder, **overrides)), raise_server_exceptions=False) as client:
            _wait_ready(client)
            for seed, observation in enumerate(observations):
                assert client.post(f"/predict?episode_id=e&seed={seed}", json=observation, headers=AUTH).status_code == 200
            batch = {"observations": [observation | {"episode_id": f"b{i}"} for i, observation in enumerate(observations)]}
            assert client.post("/predict_batch?seed=7", json=batch, headers=AUTH).status_code == 200
        logs[backend] = [{k: v for k, v in row.items() if k not in ("time", "process")} for row in read_table(folder / "log", "steps")]
    assert len(logs["local"]) == 2 * len(observations)
    assert logs["ray"] == logs["local"]


# Recurrent policies: the state travels with the rows, the replicas keep none, and the answers
# are local's and RecurrentPPO's, step for step. Here, not in a module of its own: a second
# ray.init in one process fails its token check (Ray reads its auth config once), so every
# in-process Ray test shares this module's one Ray.
RECURRENT_EPISODES = [AgentRef("r0"), AgentRef("r1"), AgentRef("pair", "x"), AgentRef("pair", "y")]
RECURRENT_STEPS = 6


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_ray_answers_recurrent_episodes_as_local_and_recurrent_ppo(kind: str, local_ray: str, tmp_path: Path) -> None:
    agent = train_recurrent(ENVIRONMENTS[kind])
    folder = import_recurrent(agent, tmp_path / f"recurrent-{kind}")
    answers = {}
    for backend, settings in (("local", {}), ("ray", _ray_settings())):
        with TestClient(build_app(settings_for(folder, **settings)), raise_server_exceptions=False) as client:
            _wait_ready(client)
            client.headers.update(api_key_header(folder))
            answers[backend] = play_interleaved(client.post, agent, RECURRENT_EPISODES, RECURRENT_STEPS, restart={AgentRef("r1"): 3})
            info = client.get("/info").json()
            assert info["backend"] == backend and info["state_size"] == 32 and info["recurrent"]["episodes"] == len(RECURRENT_EPISODES)
    assert answers["ray"] == answers["local"]
