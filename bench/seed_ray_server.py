"""The Ray baseline: the seed design, FastAPI → DeploymentHandle → replica, no batching.

Every request is one call to a Ray Serve replica that runs the same TorchScript model on its
rows; no validation, no batching across requests, Serve's defaults otherwise. Our `ray` backend
is measured against this, in the same run.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.config import ProxyLocation
from ray.serve.handle import DeploymentHandle


@serve.deployment(ray_actor_options={"num_cpus": 1})
class SeedPolicy:
    def __init__(self, model_path: str) -> None:
        torch.set_num_threads(1)
        self.model = torch.jit.load(model_path)

    def __call__(self, rows: list[list[float]]) -> list[dict[str, Any]]:
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(torch.tensor(rows, dtype=torch.float32)), dim=-1)
            actions = torch.multinomial(probabilities, 1)[:, 0]
            chosen = probabilities.gather(1, actions[:, None])[:, 0]
        return [{"actions": [a], "probability": p} for a, p in zip(actions.tolist(), chosen.tolist(), strict=True)]


handle: list[DeploymentHandle] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ray.init(
        _node_ip_address=os.environ.get("BENCH_RAY_NODE_IP", "127.0.0.2"),
        num_cpus=int(os.environ.get("BENCH_RAY_CPUS", "2")),
        include_dashboard=False,
        configure_logging=False,
    )
    serve.start(proxy_location=ProxyLocation.Disabled)
    handle.append(serve.run(SeedPolicy.bind(os.environ["BENCH_MODEL"]), name="seed", route_prefix=None))
    yield
    serve.shutdown()
    ray.shutdown()


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(request: Request) -> dict[str, Any]:
    observation = await request.json()
    (answer,) = await handle[0].remote([list(observation.values())])
    return answer


@app.post("/predict_batch")
async def predict_batch(request: Request) -> dict[str, Any]:
    body = await request.json()
    return {"results": await handle[0].remote([list(o.values()) for o in body["observations"]])}


@app.get("/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}
