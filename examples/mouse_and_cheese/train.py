"""Train the `mouse_and_cheese` example policy with PPO.

A mouse walks on a small grid until it reaches the cheese. The policy sees the six observations
of the original Pathmind example, in this order (the order of `schema.yaml`):

    mouse_row, mouse_col, mouse_row_distance, mouse_col_distance, cheese_row, cheese_col

and picks one of four moves: up, down, left, right. The distances are cheese minus mouse.

Run from the repository root:

    python examples/mouse_and_cheese/train.py

It trains (fixed seeds, so the result is reproducible), evaluates the trained policy against a
uniformly random one, and writes `models/model.pt2`: a `torch.export` program whose forward maps
float32 observations [B, 6] to the 4 move logits [B, 4] (no softmax; the server applies it).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

MODEL_PATH = Path(__file__).resolve().parent / "models" / "model.pt2"
# Moves in the order of the schema's labels: up, down, left, right (row 0 is the top row).
MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])


@dataclass
class Args:
    seed: int = 1
    grid_size: int = 6  # a 6x6 grid: rows and columns 0..5
    max_steps: int = 50  # episode cap
    step_penalty: float = 0.01  # reward per step is -step_penalty; +1 on reaching the cheese
    # PPO
    total_timesteps: int = 100_000
    num_envs: int = 16
    num_steps: int = 64  # steps per env per rollout
    learning_rate: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    # evaluation
    eval_episodes: int = 100


class MouseAndCheese:
    """`num_envs` independent gridworlds stepped together (numpy, auto-reset on episode end)."""

    def __init__(self, num_envs: int, args: Args, seed: int) -> None:
        self.num_envs = num_envs
        self.size = args.grid_size
        self.max_steps = args.max_steps
        self.step_penalty = args.step_penalty
        self.rng = np.random.default_rng(seed)
        self.mouse = np.zeros((num_envs, 2), dtype=np.int64)
        self.cheese = np.zeros((num_envs, 2), dtype=np.int64)
        self.steps = np.zeros(num_envs, dtype=np.int64)

    def _place(self, envs: np.ndarray) -> None:
        """Put mouse and cheese on two distinct random cells in the given envs."""
        for i in envs:
            cells = self.rng.choice(self.size * self.size, size=2, replace=False)
            self.mouse[i] = divmod(int(cells[0]), self.size)
            self.cheese[i] = divmod(int(cells[1]), self.size)
            self.steps[i] = 0

    def observe(self) -> np.ndarray:
        """The schema's six observations, in schema order."""
        distance = self.cheese - self.mouse
        return np.concatenate([self.mouse, distance, self.cheese], axis=1).astype(np.float32)

    def reset(self) -> np.ndarray:
        self._place(np.arange(self.num_envs))
        return self.observe()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Move every mouse; walls block. Returns (next obs, reward, done, reached cheese).

        Envs whose episode ended are reset, so the returned obs is the first one of the next
        episode there (as in gymnasium's vector envs).
        """
        self.mouse = np.clip(self.mouse + MOVES[actions], 0, self.size - 1)
        self.steps += 1
        reached = np.all(self.mouse == self.cheese, axis=1)
        reward = np.where(reached, 1.0, -self.step_penalty).astype(np.float32)
        done = reached | (self.steps >= self.max_steps)
        self._place(np.flatnonzero(done))
        return self.observe(), reward, done, reached


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Actor(nn.Module):
    """The served policy: observations [B, 6] → move logits [B, 4]."""

    def __init__(self, grid_size: int) -> None:
        super().__init__()
        # Fixed input scale (no learned statistics): positions and distances to about [-1, 1].
        self.register_buffer("obs_scale", torch.full((6,), float(grid_size - 1)))
        self.net = nn.Sequential(
            layer_init(nn.Linear(6, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 4), std=0.01),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs / self.obs_scale)


class Critic(nn.Module):
    """The value function, used only in training."""

    def __init__(self, grid_size: int) -> None:
        super().__init__()
        self.register_buffer("obs_scale", torch.full((6,), float(grid_size - 1)))
        self.net = nn.Sequential(
            layer_init(nn.Linear(6, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs / self.obs_scale).squeeze(-1)


def train(args: Args) -> Actor:
    actor, critic = Actor(args.grid_size), Critic(args.grid_size)
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=args.learning_rate, eps=1e-5)
    env = MouseAndCheese(args.num_envs, args, seed=args.seed)

    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size

    # Rollout storage.
    obs_buf = torch.zeros((args.num_steps, args.num_envs, 6))
    actions_buf = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long)
    logprobs_buf = torch.zeros((args.num_steps, args.num_envs))
    rewards_buf = torch.zeros((args.num_steps, args.num_envs))
    dones_buf = torch.zeros((args.num_steps, args.num_envs))
    values_buf = torch.zeros((args.num_steps, args.num_envs))

    next_obs = torch.from_numpy(env.reset())
    next_done = torch.zeros(args.num_envs)
    episode_returns = np.zeros(args.num_envs)
    finished_returns: list[float] = []

    for iteration in range(1, num_iterations + 1):
        # Linearly anneal the learning rate to 0.
        optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1) / num_iterations) * args.learning_rate

        # 1. Collect a rollout with the current policy.
        for step in range(args.num_steps):
            obs_buf[step] = next_obs
            dones_buf[step] = next_done
            with torch.no_grad():
                dist = Categorical(logits=actor(next_obs))
                action = dist.sample()
                values_buf[step] = critic(next_obs)
            actions_buf[step] = action
            logprobs_buf[step] = dist.log_prob(action)

            obs_np, reward, done, _ = env.step(action.numpy())
            rewards_buf[step] = torch.from_numpy(reward)
            next_obs, next_done = torch.from_numpy(obs_np), torch.from_numpy(done.astype(np.float32))
            episode_returns += reward
            finished_returns.extend(episode_returns[done].tolist())
            episode_returns[done] = 0.0
        # The 50-step cap ends few episodes once the mouse has learned; treating it as terminal
        # (not bootstrapping) keeps the code short and costs little here.

        # 2. Generalized advantage estimation.
        with torch.no_grad():
            next_value = critic(next_obs)
            advantages = torch.zeros_like(rewards_buf)
            last_gae = torch.zeros(args.num_envs)
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    next_nonterminal, next_values = 1.0 - next_done, next_value
                else:
                    next_nonterminal, next_values = 1.0 - dones_buf[t + 1], values_buf[t + 1]
                delta = rewards_buf[t] + args.gamma * next_values * next_nonterminal - values_buf[t]
                last_gae = delta + args.gamma * args.gae_lambda * next_nonterminal * last_gae
                advantages[t] = last_gae
            returns = advantages + values_buf

        # 3. PPO update on the flattened batch.
        b_obs = obs_buf.reshape(-1, 6)
        b_actions = actions_buf.reshape(-1)
        b_logprobs = logprobs_buf.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        for _ in range(args.update_epochs):
            for mb in torch.randperm(batch_size).split(minibatch_size):
                dist = Categorical(logits=actor(b_obs[mb]))
                ratio = (dist.log_prob(b_actions[mb]) - b_logprobs[mb]).exp()
                mb_adv = b_advantages[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_loss = 0.5 * ((critic(b_obs[mb]) - b_returns[mb]) ** 2).mean()
                loss = pg_loss - args.ent_coef * dist.entropy().mean() + args.vf_coef * v_loss

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], args.max_grad_norm)
                optimizer.step()

        if iteration % 10 == 0 or iteration == num_iterations:
            recent = np.mean(finished_returns[-200:]) if finished_returns else float("nan")
            print(f"iteration {iteration}/{num_iterations}  steps {iteration * batch_size}  mean return (last 200 episodes) {recent:.3f}")
    return actor


def evaluate(args: Args, actor: Actor | None, seed: int) -> tuple[float, float, float, float]:
    """Play `eval_episodes` episodes: greedy (argmax) with `actor`, uniformly random with None.

    Returns (mean return, success rate, mean steps per episode, mean shortest possible steps).
    """
    env = MouseAndCheese(1, args, seed=seed)
    action_rng = np.random.default_rng(seed + 1)
    returns, successes, lengths, shortest = [], [], [], []
    obs = env.reset()
    for _ in range(args.eval_episodes):
        shortest.append(np.abs(obs[0, 2:4]).sum())  # Manhattan distance at the start
        total, steps, done, reached = 0.0, 0, False, False
        while not done:
            if actor is None:
                action = action_rng.integers(4, size=1)
            else:
                with torch.no_grad():
                    action = actor(torch.from_numpy(obs)).argmax(dim=1).numpy()
            obs, reward, done_arr, reached_arr = env.step(action)
            total += float(reward[0])
            steps += 1
            done, reached = bool(done_arr[0]), bool(reached_arr[0])
        returns.append(total)
        successes.append(reached)
        lengths.append(steps)
    return float(np.mean(returns)), float(np.mean(successes)), float(np.mean(lengths)), float(np.mean(shortest))


def export(actor: Actor, path: Path) -> None:
    """Save the actor as a torch.export program with a dynamic batch dimension, then check it."""
    actor = actor.eval()
    example_obs = torch.zeros((2, 6), dtype=torch.float32)  # batch 2, so the batch dim stays dynamic
    program = torch.export.export(actor, (example_obs,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)

    loaded = torch.export.load(path).module()
    for batch in (1, 100):
        obs = torch.rand((batch, 6)) * 5.0
        out = loaded(obs)
        assert out.shape == (batch, 4), out.shape
        assert torch.allclose(out, actor(obs), atol=1e-5)
    print(f"saved {path} (input [B, 6] -> logits [B, 4]; checked batches of 1 and 100)")


def main() -> None:
    args = Args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    start = time.perf_counter()
    actor = train(args)
    train_seconds = time.perf_counter() - start
    print(f"training took {train_seconds:.0f} s for {args.total_timesteps} steps (seed {args.seed})")

    # Both policies play the same 100 starting positions (same env seed).
    eval_seed = 12345
    trained = evaluate(args, actor, eval_seed)
    random = evaluate(args, None, eval_seed)
    print(
        f"evaluation over {args.eval_episodes} episodes on a {args.grid_size}x{args.grid_size} grid (shortest path averages {trained[3]:.2f} steps):"
    )
    for name, (ret, success, steps, _) in (("trained (greedy)", trained), ("uniform random", random)):
        print(f"  {name:17s} mean return {ret:7.3f}  reached cheese {success:6.1%}  mean steps {steps:5.2f}")

    export(actor, MODEL_PATH)


if __name__ == "__main__":
    main()
