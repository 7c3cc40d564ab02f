"""OIP over gRPC (DESIGN.md section 12) with the real tritonclient.grpc against real servers of the
examples (`uvicorn app:app` with POLICY_SERVER_GRPC_PORT): health and metadata, one ModelInfer
and streams of 1,000 observations answering as the REST routes do, keys, bad tensors, typed
contents, REST and gRPC sharing forward passes, SIGTERM draining an open stream, workers
sharing the port.

tritonclient runs in its own venv (client_venvs.py): tritonclient_grpc_calls.py holds the calls.
"""

import json
import random
import signal
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from client_venvs import TRITONCLIENT, client_python, run_client
from conftest import API_KEY, AUTH, mouse_observation
from ray_support import NODE_IP, policy_copy, ray_temp_dir, ready_statuses, wait_until
from servers import REPO, Server, free_port, run, running_server, serve_command, uvicorn_command
from test_metrics import sample_value

from policy_server.errors import ConfigError
from policy_server.settings import Settings

EXAMPLES = ("mouse_and_cheese", "tuple_masking", "pendulum")
CALLS = Path(__file__).with_name("tritonclient_grpc_calls.py")
STREAM_LENGTH = 1000
WRONG_KEY = "not-the-key-0451"
Observation = dict[str, Any]


@pytest.fixture(scope="module")
def triton() -> Path:
    return client_python("tritonclient", TRITONCLIENT)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, tuple[Server, str]]]:
    """Per example: its server and gRPC address."""
    with ExitStack() as stack:
        started = {}
        for example in EXAMPLES:
            port, grpc_port = free_port(), free_port()
            env = {"POLICY_SERVER_GRPC_PORT": str(grpc_port)}
            server = stack.enter_context(running_server(uvicorn_command(port), port, cwd=REPO / "examples" / example, env=env))
            started[example] = server, f"127.0.0.1:{grpc_port}"
        yield started


def call(triton: Path, tmp_path: Path, command: str, job: dict[str, Any]) -> Any:
    path = tmp_path / f"{command}-job.json"
    path.write_text(json.dumps(job))
    return run_client(triton, CALLS.read_text(), command, str(path))


def job_for(servers: dict[str, tuple[Server, str]], example: str, **fields: Any) -> dict[str, Any]:
    server, address = servers[example]
    return {"grpc": address, "rest": server.url, "model": example, "headers": AUTH, **fields}


def observations(example: str, count: int, rng: random.Random) -> list[Observation]:
    """Valid observations of the example, within its schema's bounds."""
    if example == "mouse_and_cheese":
        cells = [((rng.randint(0, 5), rng.randint(0, 5)), (rng.randint(0, 5), rng.randint(0, 5))) for _ in range(count)]
        return [mouse_observation(mouse, cheese) for mouse, cheese in cells]
    if example == "tuple_masking":
        return [
            {
                "queue_lengths": [rng.uniform(0, 10), rng.uniform(0, 10)],
                "job_size": rng.uniform(0.5, 1.5),
                "urgency": rng.random(),
                "energy_price": rng.random(),
                "actionMask": _mask(rng),
            }
            for _ in range(count)
        ]
    return [{"cos_theta": rng.uniform(-1, 1), "sin_theta": rng.uniform(-1, 1), "theta_dot": rng.uniform(-8, 8)} for _ in range(count)]


def _mask(rng: random.Random) -> list[bool]:
    """A mask leaving each head (machine: 2, speed: 3) at least one choice."""
    machine = [rng.random() < 0.7 for _ in range(2)]
    speed = [rng.random() < 0.7 for _ in range(3)]
    machine[rng.randrange(2)] = True
    speed[rng.randrange(3)] = True
    return machine + speed


def rest_decisions(server: Server, batch: list[Observation], *, seed: int | None = None, deterministic: bool = False) -> list[Any]:
    params: dict[str, Any] = {"deterministic": str(deterministic).lower()}
    if seed is not None:
        params["seed"] = seed
    response = httpx.post(f"{server.url}/predict_batch", json={"observations": batch}, params=params, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def assert_same_decision(outputs: dict[str, Any], row: int, rest: dict[str, Any], example: str) -> None:
    if example == "pendulum":
        assert outputs["actions"][row] == pytest.approx(rest["actions"], rel=1e-6, abs=1e-6)
        assert "probability" not in outputs
    else:
        assert outputs["actions"][row] == rest["actions"]
        assert outputs["probability"][row] == pytest.approx(rest["probability"], rel=1e-6)


# --- health, metadata ---------------------------------------------------------------------------


def test_health_and_metadata(servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path) -> None:
    answer = call(triton, tmp_path, "health", job_for(servers, "tuple_masking"))
    assert answer["live"] is True and answer["ready"] is True and answer["model_ready"] is True
    assert answer["server"]["name"] == "policy-server" and "binary_tensor_data" in answer["server"]["extensions"]
    model = answer["model"]
    assert model["name"] == "tuple_masking" and model["versions"] == ["1"]
    inputs = {entry["name"]: (entry["datatype"], entry["shape"]) for entry in model["inputs"]}
    assert inputs == {
        "queue_lengths": ("FP32", ["-1", "2"]),
        "job_size": ("FP32", ["-1"]),
        "urgency": ("FP32", ["-1"]),
        "energy_price": ("FP32", ["-1"]),
        "actionMask": ("BOOL", ["-1", "5"]),
    }
    outputs = {entry["name"]: entry["datatype"] for entry in model["outputs"]}
    assert outputs["actions"] == "INT64" and outputs["probability"] == "FP64"
    assert answer["unknown_version"]["status"] == "StatusCode.NOT_FOUND" and "version '99'" in answer["unknown_version"]["message"]
    assert answer["unknown_model"]["status"] == "StatusCode.NOT_FOUND" and "tuple_masking" in answer["unknown_model"]["message"]


# --- answers equal to REST's ----------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES)
def test_one_infer_answers_as_rest(servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path, example: str) -> None:
    server = servers[example][0]
    batch = observations(example, 16, random.Random(example))
    sampled = call(triton, tmp_path, "infer", job_for(servers, example, observations=batch, parameters={"seed": 7}))
    deterministic = call(triton, tmp_path, "infer", job_for(servers, example, observations=batch, parameters={"deterministic": True}))
    assert sampled["id"] == "one" and sampled["model_version"] == "1"
    for row, rest in enumerate(rest_decisions(server, batch, seed=7)):
        assert_same_decision(sampled["outputs"], row, rest, example)
    for row, rest in enumerate(rest_decisions(server, batch, deterministic=True)):
        assert_same_decision(deterministic["outputs"], row, rest, example)
    one = httpx.post(f"{server.url}/predict_deterministic", json=batch[0], headers=AUTH).json()
    assert_same_decision(deterministic["outputs"], 0, one, example)


@pytest.mark.parametrize("example", EXAMPLES)
def test_stream_of_1000_answers_each_as_rest(servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path, example: str) -> None:
    """Message k: seed k (even k) or deterministic (odd k); each answer, found by its request id,
    equals REST's /predict (same seed) or /predict_deterministic for the same observation."""
    server = servers[example][0]
    batch = observations(example, STREAM_LENGTH, random.Random(f"stream {example}"))
    parameters = [{"seed": k} if k % 2 == 0 else {"deterministic": True} for k in range(STREAM_LENGTH)]
    answer = call(triton, tmp_path, "stream", job_for(servers, example, observations=batch, parameters=parameters))
    assert answer["errors"] == []
    assert sorted(answer["results"], key=int) == [str(k) for k in range(STREAM_LENGTH)]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as rest:
        for k, observation in enumerate(batch):
            if k % 2 == 0:
                expected = rest.post("/predict", json=observation, params={"seed": k}).json()
            else:
                expected = rest.post("/predict_deterministic", json=observation).json()
            assert_same_decision(answer["results"][str(k)]["outputs"], 0, expected, example)


# --- keys -----------------------------------------------------------------------------------------


def test_keys_are_enforced_and_never_echoed(servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path) -> None:
    server = servers["mouse_and_cheese"][0]
    (observation,) = observations("mouse_and_cheese", 1, random.Random(1))
    case = {"inputs": [{"name": name, "datatype": "FP32", "values": [value]} for name, value in observation.items()]}
    bearer = {"authorization": f"Bearer {API_KEY}"}
    headers = [{}, {"access-token": WRONG_KEY}, {"authorization": f"Bearer {WRONG_KEY}"}, bearer]
    unary = call(triton, tmp_path, "calls", job_for(servers, "mouse_and_cheese", cases=[case | {"headers": h} for h in headers]))
    assert [answer.get("status") for answer in unary] == [
        "StatusCode.UNAUTHENTICATED",
        "StatusCode.PERMISSION_DENIED",
        "StatusCode.PERMISSION_DENIED",
        None,
    ]
    assert "access-token" in unary[0]["message"]
    assert "outputs" in unary[3]
    for headers_sent in ({}, {"access-token": WRONG_KEY}):
        streamed = call(triton, tmp_path, "stream_calls", job_for(servers, "mouse_and_cheese", headers=headers_sent, cases=[case]))
        (refused,) = streamed["received"]
        assert refused["status"] == ("StatusCode.UNAUTHENTICATED" if not headers_sent else "StatusCode.PERMISSION_DENIED")
    refusals = {
        status: call(triton, tmp_path, "health", job_for(servers, "mouse_and_cheese", headers=headers_sent))
        for status, headers_sent in (("UNAUTHENTICATED", {}), ("PERMISSION_DENIED", {"access-token": WRONG_KEY}))
    }
    for status, answer in refusals.items():
        assert answer["live"] is True and answer["ready"] is True  # the server's health needs no key, a model's calls do
        assert answer["model"]["status"] == answer["model_ready"]["status"] == f"StatusCode.{status}"
    everything = json.dumps([unary, streamed, refusals]) + server.read_log()
    assert WRONG_KEY not in everything and API_KEY not in everything


# --- bad tensors ----------------------------------------------------------------------------------


def mouse_case(**changes: dict[str, Any] | None) -> dict[str, Any]:
    """A one-observation ModelInfer of mouse_and_cheese as FP32 [1] tensors; `changes` replace an
    input's description (None drops it)."""
    (observation,) = observations("mouse_and_cheese", 1, random.Random(2))
    inputs = {name: {"name": name, "datatype": "FP32", "values": [value]} for name, value in observation.items()}
    for name, change in changes.items():
        if change is None:
            del inputs[name]
        else:
            inputs[name] = {"name": name, **change}
    return {"inputs": list(inputs.values()), "headers": AUTH}


BAD_MOUSE_TENSORS = {
    "wrong shape": (mouse_case(cheese_col={"datatype": "FP32", "values": [[1.0, 2.0]]}), "input 'cheese_col': shape [1, 2]"),
    "wrong datatype": (mouse_case(cheese_col={"datatype": "BOOL", "values": [True]}), "input 'cheese_col': datatype BOOL"),
    "NaN": (mouse_case(cheese_col={"datatype": "FP32", "values": [float("nan")]}), "input 'cheese_col': values must be finite"),
    "out of bounds": (mouse_case(cheese_col={"datatype": "FP32", "values": [6.0]}), "input 'cheese_col': a value is outside [0, 5]"),
    "unknown input": (mouse_case(speed={"datatype": "FP32", "values": [1.0]}), "unknown input 'speed'"),
    "missing input": (mouse_case(cheese_col=None), "missing input 'cheese_col'"),
    "batch sizes differ": (mouse_case(cheese_col={"datatype": "FP32", "values": [1.0, 2.0]}), "different batch sizes"),
}


def test_bad_tensors_are_invalid_argument_with_a_clear_message(
    servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path
) -> None:
    cases = [case for case, _ in BAD_MOUSE_TENSORS.values()]
    answers = call(triton, tmp_path, "calls", job_for(servers, "mouse_and_cheese", cases=cases))
    for (what, (_, message)), answer in zip(BAD_MOUSE_TENSORS.items(), answers, strict=True):
        assert answer["status"] == "StatusCode.INVALID_ARGUMENT", (what, answer)
        assert message in answer["message"], (what, answer)


def test_an_all_masked_head_is_invalid_argument(servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path) -> None:
    (observation,) = observations("tuple_masking", 1, random.Random(3))
    observation["actionMask"] = [True, True, False, False, False]  # no speed allowed
    inputs = [
        {"name": name, "datatype": "BOOL" if name == "actionMask" else "FP32", "values": [value]} for name, value in observation.items()
    ]
    (answer,) = call(triton, tmp_path, "calls", job_for(servers, "tuple_masking", cases=[{"inputs": inputs, "headers": AUTH}]))
    assert answer["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "mask" in answer["message"] and "speed" in answer["message"], answer


def test_a_bad_message_in_a_stream_is_answered_with_its_error_and_the_stream_goes_on(
    servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path
) -> None:
    good = mouse_case()
    cases = [good, BAD_MOUSE_TENSORS["NaN"][0], good]
    received = call(triton, tmp_path, "stream_calls", job_for(servers, "mouse_and_cheese", cases=cases))["received"]
    assert len(received) == 3
    (error,) = [answer for answer in received if "message" in answer]
    assert error["status"] == "None"  # a stream's error answers carry no status: the stream is not over
    assert error["message"].startswith("request '1': input 'cheese_col': values must be finite")
    assert error["message"].endswith("(INVALID_ARGUMENT)")
    assert sorted(answer["id"] for answer in received if "outputs" in answer) == ["0", "2"]


def test_typed_contents_answer_as_raw_ones(servers: dict[str, tuple[Server, str]], triton: Path, tmp_path: Path) -> None:
    """fp32_contents and bool_contents (what other OIP clients send) decide as raw bytes do; contents
    in the wrong list, or of the wrong count, are refused by name."""
    batch = observations("tuple_masking", 4, random.Random(4))

    def typed_case(mask_field: str = "bool_contents", drop_one: bool = False) -> dict[str, Any]:
        inputs = []
        for name in ("queue_lengths", "job_size", "urgency", "energy_price", "actionMask"):
            values = [value for observation in batch for value in np.atleast_1d(observation[name]).tolist()]
            width = len(values) // len(batch)
            mask = name == "actionMask"
            field = mask_field if mask else "fp32_contents"
            shape = [len(batch), width] if width > 1 else [len(batch)]
            inputs.append({"name": name, "datatype": "BOOL" if mask else "FP32", "shape": shape, "field": field, "values": values})
        if drop_one:
            inputs[0]["values"] = inputs[0]["values"][:-1]
        return {"inputs": inputs}

    typed, misplaced, short = call(
        triton,
        tmp_path,
        "typed",
        job_for(servers, "tuple_masking", cases=[typed_case(), typed_case("int_contents"), typed_case(drop_one=True)]),
    )
    for row, rest in enumerate(rest_decisions(servers["tuple_masking"][0], batch, deterministic=True)):
        assert_same_decision(typed["outputs"], row, rest, "tuple_masking")
    assert misplaced["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "BOOL elements go in contents.bool_contents, not in int_contents" in misplaced["message"]
    assert short["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'queue_lengths': 7 values in contents.fp32_contents, but shape [4, 2] holds 8" in short["message"]


# --- one server, two transports -------------------------------------------------------------------


def test_rest_and_grpc_requests_share_forward_passes(triton: Path, tmp_path: Path) -> None:
    """With batches held 1 s for more rows, 3 gRPC and 3 REST requests sent at once are one
    forward pass of 6 rows (the batch-size histogram: one more batch, six more rows)."""
    folder = policy_copy("mouse_and_cheese", tmp_path, "shared_batches", serving="{batch_wait_ms: 1000}")
    port, grpc_port = free_port(), free_port()
    with running_server(uvicorn_command(port), port, cwd=folder, env={"POLICY_SERVER_GRPC_PORT": str(grpc_port)}) as server:

        def batches() -> tuple[float, float]:
            text = httpx.get(f"{server.url}/metrics").text
            labels = {"policy": "shared_batches"}
            return sample_value(text, "policy_server_batch_size_count", labels), sample_value(text, "policy_server_batch_size_sum", labels)

        before = batches()
        job = {"grpc": f"127.0.0.1:{grpc_port}", "rest": server.url, "model": "shared_batches", "headers": AUTH, "each": 3}
        answer = call(triton, tmp_path, "shared", job | {"observations": observations("mouse_and_cheese", 1, random.Random(5))})
        after = batches()
    assert answer["outcomes"] == ["grpc"] * 3 + ["rest 200"] * 3
    assert (after[0] - before[0], after[1] - before[1]) == (1, 6)


# --- stopping -------------------------------------------------------------------------------------


def test_sigterm_mid_stream_answers_every_request_sent(triton: Path, tmp_path: Path) -> None:
    """The client sends 500 messages, then SIGTERM: all 500 are answered, then the stream ends
    with UNAVAILABLE saying why; a new connection is refused; the server exits cleanly."""
    port, grpc_port = free_port(), free_port()
    env = {"POLICY_SERVER_GRPC_PORT": str(grpc_port), "POLICY_SERVER_DRAIN_SECONDS": "10"}
    with running_server(uvicorn_command(port), port, cwd=REPO / "examples" / "mouse_and_cheese", env=env) as server:
        job = {"grpc": f"127.0.0.1:{grpc_port}", "model": "mouse_and_cheese", "headers": AUTH, "count": 500, "pid": server.process.pid}
        answer = call(triton, tmp_path, "drain", job | {"observations": observations("mouse_and_cheese", 1, random.Random(6))})
        server.process.wait(30)
    assert answer["answered"] == [str(k) for k in range(500)]
    assert answer["end"]["status"] == "StatusCode.UNAVAILABLE" and "shutting down" in answer["end"]["message"]
    assert answer["afterwards"]["status"] == "StatusCode.UNAVAILABLE"
    assert server.returncode in (0, -signal.SIGTERM), server.log  # uvicorn ends by the signal it handled
    assert "SIGTERM: draining" in server.log and "Traceback" not in server.log


def test_a_grpc_port_in_use_stops_the_start_naming_it(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        completed = run(
            uvicorn_command(port), cwd=REPO / "examples" / "mouse_and_cheese", env={"POLICY_SERVER_GRPC_PORT": str(grpc_port)}, timeout=120
        )
    assert completed.returncode != 0
    assert f"POLICY_SERVER_GRPC_PORT: cannot listen on 127.0.0.1:{grpc_port}" in completed.stderr


def test_workers_share_the_grpc_port(triton: Path, tmp_path: Path) -> None:
    """`generate.py serve --workers 2`: each worker serves gRPC on the one port (SO_REUSEPORT)."""
    port, grpc_port = free_port(), free_port()
    folder = REPO / "examples" / "mouse_and_cheese"
    command = [*serve_command(folder, port), "--workers", "2"]
    with running_server(command, port, cwd=folder, env={"POLICY_SERVER_GRPC_PORT": str(grpc_port)}) as server:
        wait_until(lambda: server.read_log().count("OIP over gRPC on") == 2, 60, "both workers serve gRPC")
        batch = observations("mouse_and_cheese", 100, random.Random(7))
        job = {"grpc": f"127.0.0.1:{grpc_port}", "model": "mouse_and_cheese", "headers": AUTH, "observations": batch}
        answer = call(triton, tmp_path, "stream", job | {"parameters": [{"deterministic": True}] * len(batch)})
        expected = rest_decisions(server, batch, deterministic=True)
    assert server.log.count(f"OIP over gRPC on 127.0.0.1:{grpc_port} (port shared by the workers)") == 2
    assert answer["errors"] == []
    for k, rest in enumerate(expected):
        assert_same_decision(answer["results"][str(k)]["outputs"], 0, rest, "mouse_and_cheese")


def test_backend_ray_answers_over_grpc_as_over_rest(triton: Path, tmp_path: Path) -> None:
    """The server starts its own Ray: gRPC's infer and stream reach the same replicas as REST."""
    folder = policy_copy("tuple_masking", tmp_path, "grpc_on_ray")
    port, grpc_port = free_port(), free_port()
    env = {
        "POLICY_SERVER_BACKEND": "ray",
        "POLICY_SERVER_RAY_NODE_IP": NODE_IP,
        "POLICY_SERVER_RAY_CPUS": "1",
        "POLICY_SERVER_RAY_METRICS_PORT": str(free_port()),
        "POLICY_SERVER_RAY_REPLICA_CPUS": "0.5",
        "POLICY_SERVER_GRPC_PORT": str(grpc_port),
    }
    with (
        ray_temp_dir() as temp_dir,
        running_server(uvicorn_command(port), port, cwd=folder, env=env | {"RAY_TMPDIR": temp_dir}, ready_path="/health") as server,
    ):
        ready_statuses(server.url)
        batch = observations("tuple_masking", 50, random.Random(8))
        job = {"grpc": f"127.0.0.1:{grpc_port}", "model": "grpc_on_ray", "headers": AUTH, "observations": batch}
        one = call(triton, tmp_path, "infer", job | {"parameters": {"seed": 11}})
        streamed = call(triton, tmp_path, "stream", job | {"parameters": [{"deterministic": True}] * len(batch)})
        sampled, deterministic = rest_decisions(server, batch, seed=11), rest_decisions(server, batch, deterministic=True)
    for row, rest in enumerate(sampled):
        assert_same_decision(one["outputs"], row, rest, "tuple_masking")
    assert streamed["errors"] == []
    for k, rest in enumerate(deterministic):
        assert_same_decision(streamed["results"][str(k)]["outputs"], 0, rest, "tuple_masking")


def test_the_grpc_port_setting() -> None:
    assert Settings.from_env({}).grpc_port is None
    assert Settings.from_env({"POLICY_SERVER_GRPC_PORT": "8001"}).grpc_port == 8001
    for wrong in ("0", "65536", "grpc"):
        with pytest.raises(ConfigError, match="POLICY_SERVER_GRPC_PORT"):
            Settings.from_env({"POLICY_SERVER_GRPC_PORT": wrong})
