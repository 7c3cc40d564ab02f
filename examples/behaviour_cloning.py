"""Behaviour cloning from a Minari dataset exported by `python generate.py export_minari`, in plain PyTorch.

    python examples/behaviour_cloning.py DATASET_ID OUT.pt2 [--epochs 300] [--hidden 64]

An MLP learns to answer, for each logged observation, the action the served policy chose:
cross-entropy per head for discrete actions (Discrete or MultiDiscrete), mean squared error for
continuous ones (Box). It is saved as a `torch.export` program the server loads as it is: logits
`[B, sum(n)]` (every head's, concatenated in the schema's `actions` order), or the means `[B, d]`.
Put it in the policy's folder as the next version (models/N/model.pt2) and the server serves it.

Plain imitation of what was served: the rewards are not used. For offline RL proper (CQL, IQL, ...)
load the same dataset with a library that reads Minari.
"""

import argparse
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import torch
from torch import nn


def training_data(dataset: minari.MinariDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decision: the observation it was made on (not the final T+1th) and its action."""
    observations, actions = [], []
    for episode in dataset.iterate_episodes():
        observations.append(episode.observations[:-1])
        actions.append(episode.actions.reshape(len(episode), -1))
    return torch.as_tensor(np.concatenate(observations)), torch.as_tensor(np.concatenate(actions))


def head_sizes(space: gym.Space) -> list[int] | None:
    """The discrete heads' sizes; None for continuous actions."""
    if isinstance(space, gym.spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, gym.spaces.MultiDiscrete):
        return [int(n) for n in space.nvec]
    return None


def loss_of(output: torch.Tensor, actions: torch.Tensor, heads: list[int] | None) -> torch.Tensor:
    if heads is None:
        return nn.functional.mse_loss(output, actions)
    logits = torch.split(output, heads, dim=1)
    return sum(nn.functional.cross_entropy(head, actions[:, i]) for i, head in enumerate(logits)) / len(heads)


def train(dataset: minari.MinariDataset, epochs: int, hidden: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    observations, actions = training_data(dataset)
    heads = head_sizes(dataset.action_space)
    outputs = sum(heads) if heads is not None else actions.shape[1]
    model = nn.Sequential(
        nn.Linear(observations.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, outputs)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):  # full batch: a served policy's log fits in memory here
        optimiser.zero_grad()
        loss = loss_of(model(observations), actions, heads)
        loss.backward()
        optimiser.step()
    print(f"trained on {len(observations)} decisions of {dataset.total_episodes} episodes; final loss {loss.item():.4f}")
    return model.eval()


def save(model: nn.Module, input_size: int, path: Path) -> None:
    """A torch.export program with a dynamic batch dimension, as the examples' models are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(model, (torch.zeros(2, input_size),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_id", help="the id given to export_minari, e.g. mouse/served-v0")
    parser.add_argument("out", type=Path, help="the .pt2 file to write, e.g. policies/mouse/models/3/model.pt2")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    dataset = minari.load_dataset(args.dataset_id)
    model = train(dataset, args.epochs, args.hidden)
    save(model, dataset.observation_space.shape[0], args.out)


if __name__ == "__main__":
    main()
