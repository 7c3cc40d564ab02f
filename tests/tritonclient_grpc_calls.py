"""Calls to the server's gRPC port with the real tritonclient.grpc, run in tritonclient's own venv
(tests/client_venvs.py) by test_oip_grpc.py: `python tritonclient_grpc_calls.py COMMAND JOB.json`
prints one JSON document. Inputs are built as a user would: one tensor per input the model's
metadata names, of the datatype it names, batch first.
"""

import json
import os
import queue
import signal
import sys
import threading
import time
import urllib.request
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

ANSWER_TIMEOUT_S = 60


def main() -> None:
    command, job_path = sys.argv[1], sys.argv[2]
    with open(job_path) as file:
        job = json.load(file)
    print(json.dumps(COMMANDS[command](job)))


def client(job: dict[str, Any]) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(job["grpc"])


def failure(error: InferenceServerException) -> dict[str, Any]:
    return {"status": str(error.status()), "message": error.message()}


def inputs_of(job: dict[str, Any], observations: list[dict[str, Any]]) -> list[grpcclient.InferInput]:
    """One tensor per input of the model's metadata, from the observations (dicts by name)."""
    metadata = client(job).get_model_metadata(job["model"], headers=job["headers"], as_json=True)
    tensors = []
    for entry in metadata["inputs"]:
        dtype = {"FP32": np.float32, "BOOL": np.bool_, "INT64": np.int64}[entry["datatype"]]
        values = np.array([observation[entry["name"]] for observation in observations], dtype=dtype)
        tensor = grpcclient.InferInput(entry["name"], list(values.shape), entry["datatype"])
        tensor.set_data_from_numpy(values)
        tensors.append(tensor)
    return tensors


def decoded(result: grpcclient.InferResult) -> dict[str, Any]:
    response = result.get_response()
    outputs = {output.name: result.as_numpy(output.name).tolist() for output in response.outputs}
    return {"id": response.id, "model_version": response.model_version, "outputs": outputs}


def health(job: dict[str, Any]) -> dict[str, Any]:
    """The server's health and metadata, then the model's (each answer, or its failure)."""
    triton = client(job)
    answer: dict[str, Any] = {
        "live": triton.is_server_live(),
        "ready": triton.is_server_ready(),
        "server": triton.get_server_metadata(as_json=True),
    }
    headers = job["headers"]
    for name, model_call in {
        "model": lambda: triton.get_model_metadata(job["model"], headers=headers, as_json=True),
        "model_ready": lambda: triton.is_model_ready(job["model"], headers=headers),
        "unknown_version": lambda: triton.is_model_ready(job["model"], "99", headers=headers),
        "unknown_model": lambda: triton.get_model_metadata("no_such_policy", headers=headers),
    }.items():
        try:
            answer[name] = model_call()
        except InferenceServerException as error:
            answer[name] = failure(error)
    return answer


def infer(job: dict[str, Any]) -> dict[str, Any]:
    result = client(job).infer(
        job["model"], inputs_of(job, job["observations"]), request_id="one", parameters=job["parameters"], headers=job["headers"]
    )
    return decoded(result)


def stream(job: dict[str, Any]) -> dict[str, Any]:
    """One observation per message, message k with parameters[k] and request id "k"."""
    triton = client(job)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    messages = [inputs_of(job, [observation]) for observation in job["observations"]]
    triton.start_stream(callback=lambda result, error: answers.put((result, error)), headers=job["headers"])
    for index, (tensors, parameters) in enumerate(zip(messages, job["parameters"], strict=True)):
        triton.async_stream_infer(job["model"], tensors, request_id=str(index), parameters=parameters)
    results, errors = {}, []
    for _ in messages:
        result, error = answers.get(timeout=ANSWER_TIMEOUT_S)
        if error is not None:
            errors.append(failure(error))
            if error.status() is not None:  # the stream ended
                break
        else:
            answer = decoded(result)
            results[answer["id"]] = answer
    triton.stop_stream()
    return {"results": results, "errors": errors}


def raw_inputs(case: dict[str, Any]) -> list[grpcclient.InferInput]:
    """Tensors exactly as a case describes them: name, datatype, values (nested as the shape)."""
    tensors = []
    for entry in case["inputs"]:
        dtype = {"FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_, "INT64": np.int64, "INT32": np.int32}[entry["datatype"]]
        values = np.array(entry["values"], dtype=dtype)
        tensor = grpcclient.InferInput(entry["name"], list(values.shape), entry["datatype"])
        tensor.set_data_from_numpy(values)
        tensors.append(tensor)
    return tensors


def calls(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Each case as one ModelInfer: its outputs, or its status and message."""
    triton = client(job)
    answers = []
    for case in job["cases"]:
        try:
            answers.append(
                decoded(triton.infer(job["model"], raw_inputs(case), headers=case["headers"], parameters=case.get("parameters")))
            )
        except InferenceServerException as error:
            answers.append(failure(error))
    return answers


def stream_calls(job: dict[str, Any]) -> dict[str, Any]:
    """Every case as a message of one stream (request id = its index); what the callback got."""
    triton = client(job)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)), headers=job["headers"])
    for index, case in enumerate(job["cases"]):
        triton.async_stream_infer(job["model"], raw_inputs(case), request_id=str(index))
    received = []
    for _ in job["cases"]:
        result, error = answers.get(timeout=ANSWER_TIMEOUT_S)
        received.append(failure(error) if error is not None else decoded(result))
        if error is not None and error.status() is not None:
            break
    triton.stop_stream()
    return {"received": received}


def typed(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Deterministic ModelInfer with typed `contents` (what tritonclient never sends), through the stub."""
    import grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(job["grpc"]))
    metadata = tuple(job["headers"].items())
    answers = []
    for case in job["cases"]:
        request = service_pb2.ModelInferRequest(model_name=job["model"], id="typed")
        request.parameters["deterministic"].bool_param = True
        for entry in case["inputs"]:
            tensor = request.inputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
            getattr(tensor.contents, entry["field"]).extend(entry["values"])
        try:
            response = stub.ModelInfer(request, metadata=metadata)
        except grpc.RpcError as error:
            answers.append({"status": str(error.code()), "message": error.details()})
            continue
        result = grpcclient.InferResult(response)
        answers.append({"outputs": {output.name: result.as_numpy(output.name).tolist() for output in response.outputs}})
    return answers


def drain(job: dict[str, Any]) -> dict[str, Any]:
    """Send `count` messages, SIGTERM the server, then collect every answer until the stream ends;
    then a call on a new connection."""
    triton = client(job)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    tensors = inputs_of(job, job["observations"])
    triton.start_stream(callback=lambda result, error: answers.put((result, error)), headers=job["headers"])
    for index in range(job["count"]):
        triton.async_stream_infer(job["model"], tensors, request_id=str(index))
    os.kill(job["pid"], signal.SIGTERM)
    answered, end = set(), None
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while end is None and time.monotonic() < deadline:
        result, error = answers.get(timeout=ANSWER_TIMEOUT_S)
        if error is not None:
            end = failure(error)
        else:
            answered.add(result.get_response().id)
    triton.stop_stream(cancel_requests=True)
    try:
        grpcclient.InferenceServerClient(job["grpc"]).is_server_live()
        afterwards = {"status": "answered"}
    except InferenceServerException as error:
        afterwards = failure(error)
    return {"answered": sorted(answered, key=int), "end": end, "afterwards": afterwards}


def shared(job: dict[str, Any]) -> dict[str, Any]:
    """`each` gRPC ModelInfer calls and `each` REST /predict calls, all sent at the same moment."""
    observation = job["observations"][0]
    start = threading.Barrier(2 * job["each"])
    outcomes: list[str] = []

    def over_grpc() -> None:
        tensors = inputs_of(job, [observation])
        start.wait()
        client(job).infer(job["model"], tensors, headers=job["headers"])
        outcomes.append("grpc")

    def over_rest() -> None:
        request = urllib.request.Request(
            job["rest"] + "/predict", json.dumps(observation).encode(), {**job["headers"], "Content-Type": "application/json"}
        )
        start.wait()
        with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_S) as response:
            outcomes.append(f"rest {response.status}")

    threads = [threading.Thread(target=target) for target in (over_grpc, over_rest) for _ in range(job["each"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ANSWER_TIMEOUT_S)
    return {"outcomes": sorted(outcomes)}


COMMANDS = {
    "health": health,
    "infer": infer,
    "stream": stream,
    "calls": calls,
    "stream_calls": stream_calls,
    "typed": typed,
    "drain": drain,
    "shared": shared,
}

if __name__ == "__main__":
    main()
