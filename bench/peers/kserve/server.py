"""KServe's Python ModelServer serving the default example (bench/peers/kserve/README.md), on its V1
protocol: POST /v1/models/mouse:predict with {"instances": [observation, ...]}, answered as
{"predictions": [...]}; one observation or 1,024 through the same route. Usage: server.py PORT"""

import sys
from pathlib import Path
from typing import Any

# KServe's servers take their settings as flags, parsed when kserve is imported: one worker, no
# gRPC server, and no log line per request (its latency log, and uvicorn's access log).
PORT = sys.argv[1]
sys.argv[1:] = ["--http_port", PORT, "--workers", "1", "--enable_grpc", "false"]
sys.argv += ["--enable_latency_logging", "false", "--configure_logging", "false"]
import kserve  # noqa: E402  (after its flags)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peer_model  # noqa: E402  (bench/peers/peer_model.py, beside this folder)


class Mouse(kserve.Model):
    def __init__(self) -> None:
        super().__init__("mouse")
        self.load()

    def load(self) -> bool:
        self.model = peer_model.load()
        self.ready = True
        return self.ready

    async def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        return {"predictions": peer_model.answers(self.model, peer_model.rows(payload["instances"]))}


if __name__ == "__main__":
    kserve.ModelServer().start([Mouse()])
