"""OIP over gRPC (DESIGN.md section 12) with the real tritonclient.grpc against real servers of the
examples (`uvicorn app:app` with POLICY_SERVER_GRPC_PORT): health and metadata, one ModelInfer
and streams of 1,000 observations answering as the REST routes do, keys, bad tensors, typed
contents, REST and gRPC sharing forward passes, SIGTERM draining an open stream, workers
sharing the port.

tritonclient runs in its own venv (client_venvs.py): tritonclient_grpc_calls.py holds the calls.
"""

import json
import random
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_venvs import TRITONCLIENT, client_python, run_client
from conftest import API_KEY, AUTH
from servers import REPO, Server, free_port, running_server, uvicorn_command

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
        found = []
        for _ in range(count):
            mouse, cheese = (rng.randint(0, 5), rng.randint(0, 5)), (rng.randint(0, 5), rng.randint(0, 5))
            found.append(
                {
                    "mouse_row": mouse[0],
                    "mouse_col": mouse[1],
                    "mouse_row_distance": cheese[0] - mouse[0],
                    "mouse_col_distance": cheese[1] - mouse[1],
                    "cheese_row": cheese[0],
                    "cheese_col": cheese[1],
                }
            )
        return found
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
