"""The gRPC load of bench/oip.py, run in tritonclient's venv (protobuf 6; its generated stubs):
`python oip_client.py MODE ADDRESS SECONDS [N]` prints one JSON document.

- `stream N`: one ModelStreamInfer call, one observation per message, at most N messages
  unanswered (the sender waits for answers beyond that, as a robot would not need to);
- `lockstep`: one stream, each message sent once the previous one is answered;
- `unary N`: N concurrent loops of ModelInfer on one channel.

Requests are built once (the mouse example's six FP32 [1] tensors as raw bytes, tritonclient's
form): the figures are the server's and gRPC's, not the building of protobuf messages.
"""

import asyncio
import json
import statistics
import sys
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

MODEL = "mouse_and_cheese"
METADATA = (("access-token", "1234567asdfgh"),)
OBSERVATION = {"mouse_row": 0, "mouse_col": 0, "mouse_row_distance": 3, "mouse_col_distance": 2, "cheese_row": 3, "cheese_col": 2}
IDS = 4096  # distinct request ids, cycled


def request(request_id: str) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=MODEL, id=request_id)
    for name, value in OBSERVATION.items():
        message.inputs.add(name=name, datatype="FP32", shape=[1])
        message.raw_input_contents.append(np.array([value], dtype=np.float32).tobytes())
    return message


async def stream(address: str, seconds: float, window: int) -> dict[str, float]:
    requests = [request(str(k)) for k in range(IDS)]
    async with grpc.aio.insecure_channel(address) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=METADATA)
        slots = asyncio.Semaphore(window)
        deadline = time.perf_counter() + seconds
        answered = errors = 0

        async def send() -> None:
            k = 0
            while time.perf_counter() < deadline:
                await slots.acquire()
                await call.write(requests[k % IDS])
                k += 1
            await call.done_writing()

        sender = asyncio.create_task(send())
        started = time.perf_counter()
        async for response in call:
            slots.release()
            if time.perf_counter() < deadline:
                answered += 1
                errors += bool(response.error_message)
        await sender
        return {"decisions_per_s": answered / (min(time.perf_counter(), deadline) - started), "errors": errors}


async def lockstep(address: str, seconds: float) -> dict[str, float]:
    requests = [request(str(k)) for k in range(IDS)]
    async with grpc.aio.insecure_channel(address) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=METADATA)
        latencies, errors = [], 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            await call.write(requests[len(latencies) % IDS])
            response = await call.read()
            latencies.append(time.perf_counter() - sent)
            errors += bool(response.error_message)
        await call.done_writing()
        return {"decisions_per_s": len(latencies) / seconds, "p50_ms": 1000 * statistics.median(latencies), "errors": errors}


async def unary(address: str, seconds: float, concurrency: int) -> dict[str, float]:
    message = request("unary")
    async with grpc.aio.insecure_channel(address) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        deadline = time.perf_counter() + seconds
        latencies: list[float] = []
        errors = 0

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    await infer(message, metadata=METADATA)
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return {"decisions_per_s": len(latencies) / seconds, "p50_ms": 1000 * statistics.median(latencies), "errors": errors}


def main() -> None:
    mode, address, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if mode == "stream":
        result = asyncio.run(stream(address, seconds, int(sys.argv[4])))
    elif mode == "lockstep":
        result = asyncio.run(lockstep(address, seconds))
    else:
        result = asyncio.run(unary(address, seconds, int(sys.argv[4])))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
