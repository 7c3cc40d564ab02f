"""What every peer serves, as bench/reference_server.py does: the default example's TorchScript model
(BENCH_MODEL) on one thread, and per observation an action sampled from the softmax with its probability.

Imported by each peer's server.py from the peer's own venv: it needs torch alone."""

import os
from typing import Any

import torch

torch.set_num_threads(1)


def load() -> torch.jit.ScriptModule:
    return torch.jit.load(os.environ["BENCH_MODEL"])


def rows(observations: list[dict[str, float]]) -> torch.Tensor:
    """Observation dicts (in the schema's order, as our clients send them) as one float32 batch."""
    return torch.tensor([list(o.values()) for o in observations], dtype=torch.float32)


def decide(model: torch.jit.ScriptModule, batch: torch.Tensor) -> tuple[list[int], list[float]]:
    """Per row: the sampled action and its probability."""
    with torch.inference_mode():
        probabilities = torch.softmax(model(batch), dim=-1)
        actions = torch.multinomial(probabilities, 1)[:, 0]
        chosen = probabilities.gather(1, actions[:, None])[:, 0]
    return actions.tolist(), chosen.tolist()


def answers(model: torch.jit.ScriptModule, batch: torch.Tensor) -> list[dict[str, Any]]:
    """Per row, the answer as ours and the reference give it: {"actions": [a], "probability": p}."""
    actions, chosen = decide(model, batch)
    return [{"actions": [a], "probability": p} for a, p in zip(actions, chosen, strict=True)]
