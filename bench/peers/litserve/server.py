"""LitServe serving the default example (bench/peers/litserve/README.md): /predict with batching
across requests, /predict_batch one request at a time. Usage: server.py PORT"""

import sys
from pathlib import Path
from typing import Any

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peer_model  # bench/peers/peer_model.py, beside this folder


class Predict(ls.LitAPI):
    """One observation per request; LitServe gathers concurrent requests into one model call."""

    def setup(self, device: str) -> None:
        self.model = peer_model.load()

    def decode_request(self, request: dict[str, float]) -> dict[str, float]:
        return request

    def batch(self, inputs: list[dict[str, float]]) -> Any:
        return peer_model.rows(inputs)

    def predict(self, batch: Any) -> list[dict[str, Any]]:
        return peer_model.answers(self.model, batch)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


class PredictBatch(ls.LitAPI):
    """Many observations in one request: already a batch."""

    def setup(self, device: str) -> None:
        self.model = peer_model.load()

    def decode_request(self, request: dict[str, Any]) -> Any:
        return peer_model.rows(request["observations"])

    def predict(self, batch: Any) -> dict[str, Any]:
        return {"results": peer_model.answers(self.model, batch)}

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


if __name__ == "__main__":
    apis = [Predict(max_batch_size=64, batch_timeout=0.001), PredictBatch(api_path="/predict_batch")]
    server = ls.LitServer(apis, accelerator="cpu", devices=1, workers_per_device=1, fast_queue=True)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", generate_client_file=False)
