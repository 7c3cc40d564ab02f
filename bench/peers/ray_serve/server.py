"""Ray Serve serving the default example natively (bench/peers/ray_serve/README.md): Serve's own HTTP
proxy in front of one replica, a FastAPI ingress deployment whose /predict goes through
@serve.batch. Usage: server.py PORT; SIGTERM shuts Serve and Ray down."""

import os
import signal
import sys
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from ray import serve

PEERS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PEERS))
import peer_model  # noqa: E402  (bench/peers/peer_model.py, beside this folder)

app = FastAPI()


QUIET = {"enable_access_log": False, "log_level": "WARNING"}  # no log line per request


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128, logging_config=QUIET)
@serve.ingress(app)
class Mouse:
    def __init__(self) -> None:
        self.model = peer_model.load()

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def decide(self, observations: list[dict[str, float]]) -> list[dict[str, Any]]:
        return peer_model.answers(self.model, peer_model.rows(observations))

    @app.post("/predict")
    async def predict(self, request: Request) -> dict[str, Any]:
        return await self.decide(await request.json())

    @app.post("/predict_batch")
    async def predict_batch(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"results": peer_model.answers(self.model, peer_model.rows(body["observations"]))}


def main(port: int) -> None:
    # The replica imports peer_model too: Ray's workers inherit this environment.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PEERS), os.environ.get("PYTHONPATH")]))
    ray.init(_node_ip_address="127.0.0.2", num_cpus=2, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    serve.run(Mouse.bind(), name="mouse", route_prefix="/")
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(int(sys.argv[1]))
