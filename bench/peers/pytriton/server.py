"""Triton Inference Server through PyTriton serving the default example (bench/peers/pytriton/README.md),
on Triton's HTTP API, the Open Inference Protocol (KServe V2): POST /v2/models/mouse/infer with a
[rows, 6] FP32 tensor `observations`; Triton's dynamic batcher gathers concurrent requests.
Answers `actions` (INT64) and `probability` (FP32) per row. Usage: server.py PORT"""

import os
import socket
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peer_model  # bench/peers/peer_model.py, beside this folder

MAX_BATCH_SIZE = 1024  # the largest request (1,024 observations) must fit one batch

model = peer_model.load()


@batch
def infer(observations: np.ndarray) -> dict[str, np.ndarray]:
    actions, chosen = peer_model.decide(model, torch.from_numpy(observations))
    return {"actions": np.asarray(actions, dtype=np.int64)[:, None], "probability": np.asarray(chosen, dtype=np.float32)[:, None]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    # Triton's Python-backend stub links libpython3.11 by name, and the loader finds the system's
    # (Debian's 3.11.2) before this interpreter's: their stdlibs differ, and the model fails to
    # load. The stub must use the libpython of the Python that runs PyTriton.
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")]))
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(sys.argv[1]),
        grpc_address="127.0.0.1",
        grpc_port=free_port(),  # PyTriton itself talks to Triton over gRPC
        allow_metrics=False,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="mouse",
            infer_func=infer,
            inputs=[Tensor(name="observations", dtype=np.float32, shape=(6,))],
            outputs=[Tensor(name="actions", dtype=np.int64, shape=(1,)), Tensor(name="probability", dtype=np.float32, shape=(1,))],
            config=ModelConfig(max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher(max_queue_delay_microseconds=100)),
            strict=True,
        )
        triton.serve()
