"""The fast hand-written baseline: FastAPI reading the raw body with orjson, numpy rows, the same
traced (TorchScript) model, orjson out, and no validation, auth or batching at all.

What a performance-minded user writes: the ceiling for a server that parses JSON in Python.
"""

import os

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request, Response

torch.set_num_threads(1)
model = torch.jit.load(os.environ["BENCH_MODEL"])
app = FastAPI()


def decide(rows: np.ndarray) -> list[dict[str, object]]:
    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.from_numpy(rows)), dim=-1)
        actions = torch.multinomial(probabilities, 1)[:, 0]
        chosen = probabilities.gather(1, actions[:, None])[:, 0]
    return [{"actions": [a], "probability": p} for a, p in zip(actions.tolist(), chosen.tolist(), strict=True)]


def rows_of(observations: list[dict[str, float]]) -> np.ndarray:
    return np.array([list(observation.values()) for observation in observations], dtype=np.float32)


@app.post("/predict")
async def predict(request: Request) -> Response:
    observation = orjson.loads(await request.body())
    return Response(orjson.dumps(decide(rows_of([observation]))[0]), media_type="application/json")


@app.post("/predict_batch")
async def predict_batch(request: Request) -> Response:
    observations = orjson.loads(await request.body())["observations"]
    return Response(orjson.dumps({"results": decide(rows_of(observations))}), media_type="application/json")


@app.get("/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}
