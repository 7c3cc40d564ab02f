"""BentoML serving the default example (bench/peers/bentoml/README.md): /predict an adaptive-batching
API (a batchable API takes a list: one observation is `[{...}]`), /predict_batch a plain one.
Usage: server.py PORT (runs `bentoml serve` on this file's Mouse service)."""

import os
import sys
from pathlib import Path
from typing import Any

import bentoml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peer_model  # bench/peers/peer_model.py, beside this folder


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Mouse:
    def __init__(self) -> None:
        self.model = peer_model.load()

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=10)
    def predict(self, observations: list[dict[str, float]], /) -> list[dict[str, Any]]:
        return peer_model.answers(self.model, peer_model.rows(observations))

    @bentoml.api
    def predict_batch(self, observations: list[dict[str, float]]) -> dict[str, Any]:
        return {"results": peer_model.answers(self.model, peer_model.rows(observations))}


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    os.execv(
        bentoml_cli,
        [bentoml_cli, "serve", "server:Mouse", "--working-dir", str(here), "--host", "127.0.0.1", "--port", sys.argv[1]],
    )
