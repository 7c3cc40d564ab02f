"""The reference: plain FastAPI + uvicorn running the same TorchScript model in-process.

What a user writes in an afternoon: no validation, no auth, no batching, the model called on the
event loop. Our server is measured as a ratio to this, in the same run.
"""

import os
from typing import Any

import torch
from fastapi import FastAPI, Request

torch.set_num_threads(1)
model = torch.jit.load(os.environ["BENCH_MODEL"])
app = FastAPI()


def decide(rows: torch.Tensor) -> list[dict[str, Any]]:
    with torch.inference_mode():
        probabilities = torch.softmax(model(rows), dim=-1)
        actions = torch.multinomial(probabilities, 1)[:, 0]
        chosen = probabilities.gather(1, actions[:, None])[:, 0]
    return [{"actions": [a], "probability": p} for a, p in zip(actions.tolist(), chosen.tolist(), strict=True)]


@app.post("/predict")
async def predict(request: Request) -> dict[str, Any]:
    observation = await request.json()
    return decide(torch.tensor([list(observation.values())], dtype=torch.float32))[0]


@app.post("/predict_batch")
async def predict_batch(request: Request) -> dict[str, Any]:
    body = await request.json()
    rows = torch.tensor([list(o.values()) for o in body["observations"]], dtype=torch.float32)
    return {"results": decide(rows)}


@app.get("/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}
