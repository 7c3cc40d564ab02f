"""OIP over REST (issue 15, DESIGN.md section 12): real servers of the examples, called by the real
clients, unchanged (tritonclient.http with JSON and binary tensors, KServe's InferenceRESTClient,
each from its own venv), and by hand for every bad tensor. Answers are compared with what the
typed routes answer for the same observations and seed.
"""

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from client_venvs import KSERVE, TRITONCLIENT, client_python, run_client
from conftest import API_KEY, AUTH
from servers import REPO, Server, free_port, running_server, serve_command

EXAMPLES = REPO / "examples"
SEED = 11

# The same observations, as the typed routes take them, per example.
MOUSE_BATCH = [
    {"mouse_row": r, "mouse_col": c, "mouse_row_distance": r - 2.0, "mouse_col_distance": c - 3.0, "cheese_row": 2.0, "cheese_col": 3.0}
    for r, c in [(0.0, 0.0), (1.0, 4.0), (3.0, 1.0), (4.0, 4.0), (2.0, 2.0)]
]
TUPLE_BATCH = [
    {"queue_lengths": [1.0, 2.5], "job_size": 1.0, "urgency": 0.3, "energy_price": 0.8, "actionMask": [True, True, True, True, False]},
    {"queue_lengths": [0.0, 9.0], "job_size": 0.5, "urgency": 0.9, "energy_price": 0.1, "actionMask": [False, True, True, True, True]},
    {"queue_lengths": [4.0, 0.0], "job_size": 1.5, "urgency": 0.0, "energy_price": 0.5, "actionMask": [True, False, False, True, False]},
]
PENDULUM_BATCH = [{"cos_theta": math.cos(a), "sin_theta": math.sin(a), "theta_dot": d} for a, d in [(0.1, 0.0), (2.0, -3.0), (-1.0, 5.5)]]
BATCHES = {"mouse_and_cheese": MOUSE_BATCH, "tuple_masking": TUPLE_BATCH, "pendulum": PENDULUM_BATCH}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """One real server per example, started together."""
    with (
        running_server(serve_command(EXAMPLES / "mouse_and_cheese", port := free_port()), port, cwd=REPO) as mouse,
        running_server(serve_command(EXAMPLES / "tuple_masking", port := free_port()), port, cwd=REPO) as tuple_masking,
        running_server(serve_command(EXAMPLES / "pendulum", port := free_port()), port, cwd=REPO) as pendulum,
    ):
        yield {"mouse_and_cheese": mouse, "tuple_masking": tuple_masking, "pendulum": pendulum}


def columns(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The batch as one value (or list) per observation per field: what each OIP input holds."""
    return {name: [observation[name] for observation in batch] for name in batch[0]}


def datatype_of(values: list[Any]) -> str:
    first = values[0][0] if isinstance(values[0], list) else values[0]
    return "BOOL" if isinstance(first, bool) else "FP32"


def json_inputs(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    inputs = []
    for name, values in columns(batch).items():
        shape = [len(values), len(values[0])] if isinstance(values[0], list) else [len(values)]
        inputs.append({"name": name, "shape": shape, "datatype": datatype_of(values), "data": values})
    return inputs


def typed_answers(server: Server, batch: list[dict[str, Any]]) -> dict[str, Any]:
    """What the typed routes answer: sampled with SEED, deterministic, and the distributions."""
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        sampled = client.post("/predict_batch", params={"seed": SEED}, json={"observations": batch}).json()["results"]
        chosen = client.post("/predict_batch", params={"deterministic": "true"}, json={"observations": batch}).json()["results"]
        distributions = [client.post("/distribution", json=observation).json()["heads"] for observation in batch]
    return {"sampled": sampled, "deterministic": chosen, "distributions": distributions}


def assert_same_decisions(oip: dict[str, Any], typed: list[dict[str, Any]], discrete: bool) -> None:
    """OIP's `actions` and `probability` against the typed routes' results, row by row."""
    actions = np.array(oip["actions"])
    assert actions.shape[0] == len(typed)
    if discrete:
        assert actions.tolist() == [result["actions"] for result in typed]
        assert oip["probability"] == pytest.approx([result["probability"] for result in typed], rel=1e-12)
    else:
        assert np.allclose(actions, np.array([result["actions"] for result in typed], dtype=np.float32), rtol=1e-6, atol=0)
        assert "probability" not in oip


TRITON_HTTP_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, key, model, batch, seed = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
headers = {"access-token": key}
client = httpclient.InferenceServerClient(url=url)
metadata = client.get_model_metadata(model, headers=headers)
heads = [output["name"] for output in metadata["outputs"] if output["name"] not in ("actions", "probability")]
dtypes = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}


def inputs(binary):
    made = []
    for spec in metadata["inputs"]:
        values = np.array([observation[spec["name"]] for observation in batch], dtype=dtypes[spec["datatype"]])
        tensor = httpclient.InferInput(spec["name"], list(values.shape), spec["datatype"])
        tensor.set_data_from_numpy(values, binary_data=binary)
        made.append(tensor)
    return made


def answer(result, names):
    return {name: result.as_numpy(name).tolist() for name in names if result.as_numpy(name) is not None}


names = [output["name"] for output in metadata["outputs"]]
decided = [name for name in ("actions", "probability") if name in names]
out = {"live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready(model, headers=headers),
       "metadata": metadata}
for binary in (False, True):
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]
    sampled = client.infer(model, inputs(binary), outputs=requested, parameters={"seed": seed}, headers=headers)
    chosen = client.infer(model, inputs(binary), parameters={"deterministic": True}, headers=headers)
    out["binary" if binary else "json"] = {"sampled": answer(sampled, names), "deterministic": answer(chosen, decided)}
try:
    client.infer(model, inputs(True), headers={"access-token": "wrong"})
except InferenceServerException as error:
    out["wrong_key"] = [error.status(), error.message()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return client_python("tritonclient", TRITONCLIENT)


@pytest.mark.parametrize("example", list(BATCHES))
def test_tritonclient_http_json_and_binary_answer_as_the_typed_routes(
    example: str, servers: dict[str, Server], triton_python: Path
) -> None:
    server, batch = servers[example], BATCHES[example]
    answers = run_client(
        triton_python, TRITON_HTTP_SCRIPT, server.url.removeprefix("http://"), API_KEY, example, json.dumps(batch), str(SEED)
    )
    typed = typed_answers(server, batch)
    discrete = example != "pendulum"
    assert (answers["live"], answers["ready"], answers["model_ready"]) == (True, True, True)
    assert answers["metadata"]["name"] == example
    assert [spec["name"] for spec in answers["metadata"]["inputs"]] == list(batch[0])
    for form in ("json", "binary"):
        assert_same_decisions(answers[form]["sampled"], typed["sampled"], discrete)
        assert_same_decisions(answers[form]["deterministic"], typed["deterministic"], discrete)
        # /distribution runs one row at a time: float32 sums differ a little from a batch's
        for index, head in enumerate(typed["distributions"][0]):
            if discrete:
                expected = [row[index]["probabilities"] for row in typed["distributions"]]
                assert np.allclose(answers[form]["sampled"][f"{head['name']}_probabilities"], expected, rtol=1e-6, atol=1e-9)
            else:
                expected = [row[index]["mean"] for row in typed["distributions"]]
                assert np.allclose(answers[form]["sampled"][f"{head['name']}_mean"], expected, rtol=1e-6, atol=1e-9)
    status, message = answers["wrong_key"]
    assert status == "403" and "Wrong api key" in message and API_KEY not in message


KSERVE_SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, key, model, batch, seed = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])


async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    headers = {"access-token": key}
    out = {"ready": await client.is_server_ready(url), "model_ready": await client.is_model_ready(url, model, headers=headers)}
    inputs = []
    for name in batch[0]:
        values = np.array([observation[name] for observation in batch], dtype=np.float32)
        tensor = InferInput(name, list(values.shape), "FP32")
        tensor.set_data_from_numpy(values, binary_data=True)
        inputs.append(tensor)
    request = InferRequest(model_name=model, infer_inputs=inputs, parameters={"seed": seed})
    response = await client.infer(url, request, model_name=model, headers=headers)
    out["sampled"] = {output.name: output.as_numpy().tolist() for output in response.outputs}
    try:
        await client.infer(url, request, model_name="no_such_model", headers=headers)
    except Exception as error:
        out["unknown_model"] = str(error)
    print(json.dumps(out))


asyncio.run(main())
"""


def test_kserve_rest_client_answers_as_the_typed_routes(servers: dict[str, Server]) -> None:
    server = servers["mouse_and_cheese"]
    python = client_python("kserve", KSERVE)
    answers = run_client(python, KSERVE_SCRIPT, server.url, API_KEY, "mouse_and_cheese", json.dumps(MOUSE_BATCH), str(SEED))
    assert (answers["ready"], answers["model_ready"]) == (True, True)
    assert_same_decisions(answers["sampled"], typed_answers(server, MOUSE_BATCH)["sampled"], discrete=True)
    assert "unknown model 'no_such_model'" in answers["unknown_model"] and "404" in answers["unknown_model"]


# --- by hand: the routes, every bad tensor, auth ------------------------------------------------


def infer(
    server: Server, body: Any, *, headers: dict[str, str] | None = None, path: str = "/v2/models/tuple_masking/infer"
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={**AUTH, **(headers or {})})


def with_input(batch: list[dict[str, Any]], name: str, **changes: Any) -> dict[str, Any]:
    inputs = [dict(tensor, **changes) if tensor["name"] == name else tensor for tensor in json_inputs(batch)]
    return {"inputs": inputs}


BAD_TENSORS = {
    "shape against data": (with_input(TUPLE_BATCH, "urgency", shape=[4]), "3 values, but shape [4] holds 4"),
    "a list field as a scalar": (with_input(TUPLE_BATCH, "queue_lengths", shape=[6], data=[1.0] * 6), "not [batch, items]"),
    "too many items": (with_input(TUPLE_BATCH, "queue_lengths", shape=[3, 3], data=[1.0] * 9), "3 items per observation, outside 2 to 2"),
    "a float as BOOL": (with_input(TUPLE_BATCH, "actionMask", datatype="FP32", data=[1.0] * 15), "datatype FP32 does not fit a bool"),
    "bools as numbers": (with_input(TUPLE_BATCH, "urgency", data=[True, False, True]), "FP32 values must be numbers"),
    "strings": (with_input(TUPLE_BATCH, "urgency", datatype="BYTES", data=["a", "b", "c"]), "BYTES is not taken"),
    "unknown datatype": (with_input(TUPLE_BATCH, "urgency", datatype="FP8"), "unknown datatype 'FP8'"),
    "over the maximum": (with_input(TUPLE_BATCH, "urgency", data=[0.5, 1.5, 0.5]), "outside [0, 1]"),
    "under the minimum": (with_input(TUPLE_BATCH, "job_size", data=[0.4, 1.0, 1.0]), "outside [0.5, 1.5]"),
    "beyond float32": (with_input(TUPLE_BATCH, "urgency", datatype="FP64", data=[1e300, 0.0, 0.0]), "outside [0, 1]"),
    "a negative dimension": (with_input(TUPLE_BATCH, "urgency", shape=[-3]), "non-negative integers"),
    "unknown input": (
        {"inputs": [*json_inputs(TUPLE_BATCH), {"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]},
        "unknown input 'x'",
    ),
    "missing input": ({"inputs": json_inputs(TUPLE_BATCH)[1:]}, "missing input 'queue_lengths'"),
    "batches apart": (with_input(TUPLE_BATCH, "urgency", shape=[2], data=[0.1, 0.2]), "different batch sizes [2, 3]"),
    "no inputs": ({"outputs": []}, "no 'inputs'"),
    "not JSON": (b"{inputs", "not valid JSON"),
    "unknown output": ({**with_input(TUPLE_BATCH, "urgency"), "outputs": [{"name": "value"}]}, "unknown output 'value'"),
    "a seed of text": ({**with_input(TUPLE_BATCH, "urgency"), "parameters": {"seed": "7"}}, "parameter 'seed' must be an integer"),
    "deterministic as text": (
        {**with_input(TUPLE_BATCH, "urgency"), "parameters": {"deterministic": "yes"}},
        "'deterministic' must be true or false",
    ),
    "all of a head masked": (
        with_input(TUPLE_BATCH, "actionMask", data=[[False, False, True, True, True]] * 3),
        "the action mask allows no action of head 'machine'",
    ),
    "a raw row too short": (
        {"inputs": [{"name": "obs", "shape": [1, 3], "datatype": "FP32", "data": [0.0, 0.0, 0.0]}]},
        "is not [batch, 10]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_a_bad_tensor_is_a_400_that_says_what_is_wrong(case: str, servers: dict[str, Server]) -> None:
    body, message = BAD_TENSORS[case]
    answer = infer(servers["tuple_masking"], body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]


def binary_request(tensors: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}} for n, d, s, b in tensors]}
    ).encode()
    return header + b"".join(b for *_, b in tensors), {"Inference-Header-Content-Length": str(len(header))}


def test_binary_tensors_are_checked_as_json_ones(servers: dict[str, Server]) -> None:
    server = servers["pendulum"]
    path = "/v2/models/pendulum/infer"
    good = [("cos_theta", "FP32", [1], struct.pack("<f", 1.0)), ("sin_theta", "FP32", [1], struct.pack("<f", 0.0))]
    nan = struct.pack("<f", float("nan"))
    cases = {
        "NaN": ([*good, ("theta_dot", "FP32", [1], nan)], "values must be finite"),
        "short bytes": ([*good, ("theta_dot", "FP32", [2], struct.pack("<f", 0.0))], "4 bytes of data, but shape [2] of FP32 needs 8"),
        "infinite FP64": ([*good, ("theta_dot", "FP64", [1], struct.pack("<d", float("inf")))], "outside [-8, 8]"),
    }
    for case, (tensors, message) in cases.items():
        body, headers = binary_request(tensors)
        answer = infer(server, body, headers=headers, path=path)
        assert answer.status_code == 400 and message in answer.json()["error"], (case, answer.text)
    body, headers = binary_request([*good, ("theta_dot", "FP32", [1], struct.pack("<f", 0.5))])
    answer = infer(server, body + b"extra", headers=headers, path=path)
    assert answer.status_code == 400 and "5 bytes after the tensors" in answer.json()["error"]
    answer = infer(server, body, headers={"Inference-Header-Content-Length": "9999"}, path=path)
    assert answer.status_code == 400 and "not a length within the body" in answer.json()["error"]
    answer = infer(server, body, headers=headers, path=path)
    assert answer.status_code == 200, answer.text
    (actions,) = answer.json()["outputs"]
    assert actions["name"] == "actions" and actions["datatype"] == "FP32" and actions["shape"] == [1, 1]


def test_binary_outputs_come_after_the_json_header(servers: dict[str, Server]) -> None:
    server = servers["mouse_and_cheese"]
    rows = np.array([[observation[name] for name in MOUSE_BATCH[0]] for observation in MOUSE_BATCH], dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [{"name": "obs", "datatype": "FP32", "shape": list(rows.shape), "parameters": {"binary_data_size": rows.nbytes}}],
            "parameters": {"deterministic": True, "binary_data_output": True},
            "id": "request-7",
        }
    ).encode()
    answer = infer(
        server,
        header + rows.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        path="/v2/models/mouse_and_cheese/infer",
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers["inference-header-content-length"])
    document = json.loads(answer.content[:length])
    assert document["id"] == "request-7" and document["model_version"] == answer.headers["x-policy-version"] == "1"
    sizes = [output["parameters"]["binary_data_size"] for output in document["outputs"]]
    assert [output["name"] for output in document["outputs"]] == ["actions", "probability"] and sizes == [5 * 8, 5 * 8]
    actions = np.frombuffer(answer.content[length : length + sizes[0]], dtype="<i8")
    probability = np.frombuffer(answer.content[length + sizes[0] :], dtype="<f8")
    typed = typed_answers(server, MOUSE_BATCH)["deterministic"]
    assert actions.tolist() == [result["actions"][0] for result in typed]
    assert probability.tolist() == pytest.approx([result["probability"] for result in typed], rel=1e-12)


def test_server_and_model_routes(servers: dict[str, Server]) -> None:
    server = servers["mouse_and_cheese"]
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/v2").json()["extensions"] == ["binary_tensor_data", "sequence", "parameters"]
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        metadata = client.get("/v2/models/mouse_and_cheese", headers=AUTH).json()
        assert metadata == client.get("/v2/models/mouse_and_cheese/versions/1", headers=AUTH).json()
        assert metadata["versions"] == ["1"]
        assert {"name": "actions", "datatype": "INT64", "shape": [-1, 1]} in metadata["outputs"]
        assert {"name": "mouse_row", "datatype": "FP32", "shape": [-1]} in metadata["inputs"]
        assert client.get("/v2/models/mouse_and_cheese/versions/1/ready", headers=AUTH).json() == {
            "name": "mouse_and_cheese",
            "ready": True,
        }
        unknown_version = client.get("/v2/models/mouse_and_cheese/versions/4", headers=AUTH)
        assert unknown_version.status_code == 404 and "no version '4'" in unknown_version.json()["error"]
        unknown = client.post("/v2/models/nothing/infer", headers=AUTH, content=b"{}")
        assert unknown.status_code == 404 and unknown.json() == {"error": "unknown model 'nothing': the models served are mouse_and_cheese"}
        assert client.get("/v2/models/mouse_and_cheese").status_code == 401
        wrong = client.post("/v2/models/mouse_and_cheese/infer", headers={"Authorization": "Bearer nope"}, content=b"{}")
        assert wrong.status_code == 403 and API_KEY not in wrong.text
        bearer = client.post(
            "/v2/models/mouse_and_cheese/infer",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"inputs": [{"name": "obs", "shape": [1, 6], "datatype": "INT32", "data": [[0, 0, -2, -3, 2, 3]]}]},
        )
        assert bearer.status_code == 200 and bearer.headers["x-policy-name"] == "mouse_and_cheese"
        metrics = client.get("/metrics").text
        assert 'route="/v2/models/mouse_and_cheese/infer",status="200"' in metrics
        assert 'route="/v2/models/{name}/{rest:path}",status="404"' in metrics
    assert API_KEY not in server.read_log()


def test_a_sequence_id_names_the_episode_logged(tmp_path: Path) -> None:
    """tritonclient's sequence_id is the episode of the experience log: the reward finds its step."""
    port = free_port()
    env = {"POLICY_SERVER_EXPERIENCE_DIR": str(tmp_path / "experience")}
    observation = {"inputs": [{"name": "obs", "shape": [1, 6], "datatype": "FP32", "data": [0, 0, -2, -3, 2, 3]}]}
    with running_server(serve_command(EXAMPLES / "mouse_and_cheese", port), port, cwd=REPO, env=env) as server:
        path = "/v2/models/mouse_and_cheese/infer"
        for _ in range(2):
            assert infer(server, {**observation, "parameters": {"sequence_id": 42, "sequence_start": True}}, path=path).status_code == 200
        assert infer(server, {**observation, "parameters": {"sequence_id": -1}}, path=path).status_code == 400
        reward = httpx.post(server.url + "/experience", headers=AUTH, json={"episode_id": "42", "reward": 1.0, "terminated": True})
        assert reward.status_code == 200 and reward.json()["step"] == 1 and reward.json()["ended"] is True
