"""Train the `pendulum` example policy (continuous torque) with PPO on gymnasium's Pendulum-v1.

The pendulum starts at a random angle and speed; the policy applies a torque in [-2, 2] to swing
it up and hold it upright. Each of the 200 steps costs θ² + 0.1 θdot² + 0.001 torque² (θ = 0 is
upright), so an episode's return lies between about -3200 and 0.

The policy sees the schema's observations in schema order (3 columns):

    cos_theta, sin_theta, theta_dot

Run from the repository root:

    python examples/pendulum/train.py

It trains a Gaussian policy (a state-dependent mean, a learned state-independent log-std),
evaluates it against a uniformly random torque, and writes `models/model.pt2`: float32 [B, 3] →
[B, 2] = (mean, log_std) of the torque. The server samples N(mean, exp(log_std)) and clips to
[-2, 2]; its deterministic action is the mean, clipped. Training samples and clips the same way.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Normal

MODEL_PATH = Path(__file__).resolve().parent / "models" / "model.pt2"
ENV_ID = "Pendulum-v1"
OBS_SIZE = 3
MAX_TORQUE = 2.0


@dataclass
class Args:
    seed: int = 1
    total_timesteps: int = 150_000
    num_envs: int = 8
    num_steps: int = 256  # steps per env per rollout
    learning_rate: float = 1e-3
    gamma: float = 0.9  # a short horizon is enough to swing up, and it makes PPO learn fast here
    gae_lambda: float = 0.95
    num_minibatches: int = 32
    update_epochs: int = 10
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    reward_scale: float = 0.1  # rewards are about -16..0 per step; scaled for the value loss
    init_log_std: float = 0.0
    # evaluation
    eval_episodes: int = 100


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Actor(nn.Module):
    """The served policy: observations [B, 3] → [B, 2] = (torque mean, torque log-std)."""

    def __init__(self, init_log_std: float) -> None:
        super().__init__()
        # Fixed input scale: theta_dot (-8..8) to -1..1; cos and sin already are.
        self.register_buffer("obs_scale", torch.tensor([1.0, 1.0, 8.0]))
        self.mean_net = nn.Sequential(
            layer_init(nn.Linear(OBS_SIZE, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=0.01),
        )
        self.log_std = nn.Parameter(torch.full((1,), init_log_std))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        mean = self.mean_net(obs / self.obs_scale)
        # expand_as keeps the batch dimension of the output dynamic in the exported program.
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=1)

    def distribution(self, obs: torch.Tensor) -> Normal:
        mean, log_std = self(obs).chunk(2, dim=1)
        return Normal(mean.squeeze(1), log_std.exp().squeeze(1))


class Critic(nn.Module):
    """The value function, used only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("obs_scale", torch.tensor([1.0, 1.0, 8.0]))
        self.net = nn.Sequential(
            layer_init(nn.Linear(OBS_SIZE, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs / self.obs_scale).squeeze(-1)


def train(args: Args) -> Actor:
    actor, critic = Actor(args.init_log_std), Critic()
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=args.learning_rate, eps=1e-5)
    # SAME_STEP autoreset: an ended env is reset within the step that ended it, and the last
    # observation of the episode comes back in info["final_obs"] (needed for bootstrapping).
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(ENV_ID) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )

    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size

    obs_buf = torch.zeros((args.num_steps, args.num_envs, OBS_SIZE))
    actions_buf = torch.zeros((args.num_steps, args.num_envs))
    logprobs_buf = torch.zeros((args.num_steps, args.num_envs))
    rewards_buf = torch.zeros((args.num_steps, args.num_envs))
    dones_buf = torch.zeros((args.num_steps, args.num_envs))
    values_buf = torch.zeros((args.num_steps, args.num_envs))

    obs_np, _ = envs.reset(seed=args.seed)
    next_obs = torch.from_numpy(obs_np).float()
    next_done = torch.zeros(args.num_envs)
    episode_returns = np.zeros(args.num_envs)
    finished_returns: list[float] = []

    for iteration in range(1, num_iterations + 1):
        optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1) / num_iterations) * args.learning_rate

        # 1. Collect a rollout: sample the torque, send it clipped to [-2, 2] (as the server does).
        for step in range(args.num_steps):
            obs_buf[step] = next_obs
            dones_buf[step] = next_done
            with torch.no_grad():
                dist = actor.distribution(next_obs)
                action = dist.sample()
                logprobs_buf[step] = dist.log_prob(action)
                values_buf[step] = critic(next_obs)
            actions_buf[step] = action

            torque = action.clamp(-MAX_TORQUE, MAX_TORQUE).numpy()[:, None]
            obs_np, reward, terminated, truncated, info = envs.step(torque)
            done = terminated | truncated
            episode_returns += reward
            finished_returns.extend(episode_returns[done].tolist())
            episode_returns[done] = 0.0

            reward = reward * args.reward_scale
            # Pendulum episodes only end by the 200-step limit: bootstrap from the final state.
            cut = truncated & ~terminated
            if cut.any():
                final_obs = torch.from_numpy(np.stack(info["final_obs"][cut])).float()
                with torch.no_grad():
                    reward[cut] += args.gamma * critic(final_obs).numpy()
            rewards_buf[step] = torch.from_numpy(reward).float()
            next_obs = torch.from_numpy(obs_np).float()
            next_done = torch.from_numpy(done.astype(np.float32))

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

        # 3. PPO update.
        b_obs = obs_buf.reshape(-1, OBS_SIZE)
        b_actions = actions_buf.reshape(-1)
        b_logprobs = logprobs_buf.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        for _ in range(args.update_epochs):
            for mb in torch.randperm(batch_size).split(minibatch_size):
                dist = actor.distribution(b_obs[mb])
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
            recent = np.mean(finished_returns[-50:]) if finished_returns else float("nan")
            std = actor.log_std.exp().item()
            print(
                f"iteration {iteration}/{num_iterations}  steps {iteration * batch_size}  mean return (last 50 episodes) {recent:8.1f}  std {std:.2f}"
            )
    envs.close()
    return actor


def evaluate(args: Args, actor: Actor | None, seed: int) -> tuple[float, float]:
    """Mean and std of the return over `eval_episodes` episodes: the clipped mean torque with
    `actor` (as /predict_deterministic), a uniformly random torque in [-2, 2] with None."""
    env = gym.make(ENV_ID)
    env.action_space.seed(seed)
    returns = []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            if actor is None:
                torque = env.action_space.sample()
            else:
                with torch.no_grad():
                    mean = actor(torch.from_numpy(obs).float()[None])[0, :1]
                torque = mean.clamp(-MAX_TORQUE, MAX_TORQUE).numpy()
            obs, reward, terminated, truncated, _ = env.step(torque)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def export(actor: Actor, path: Path) -> None:
    """Save the actor as a torch.export program with a dynamic batch dimension, then check it."""
    actor = actor.eval()
    example_obs = torch.zeros((2, OBS_SIZE), dtype=torch.float32)  # batch 2 keeps the dim dynamic
    program = torch.export.export(actor, (example_obs,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)

    loaded = torch.export.load(path).module()
    for batch in (1, 100):
        obs = torch.rand((batch, OBS_SIZE)) * 2.0 - 1.0
        out = loaded(obs)
        assert out.shape == (batch, 2), out.shape
        assert torch.allclose(out, actor(obs), atol=1e-5)
    print(f"saved {path} (input [B, {OBS_SIZE}] -> [B, 2] = mean, log_std; checked batches of 1 and 100)")


def main() -> None:
    args = Args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    start = time.perf_counter()
    actor = train(args)
    train_seconds = time.perf_counter() - start
    print(f"training took {train_seconds:.0f} s for {args.total_timesteps} steps (seed {args.seed})")

    # Both policies start from the same 100 initial states (episode seeds 12345..12444).
    eval_seed = 12345
    trained_mean, trained_std = evaluate(args, actor, eval_seed)
    random_mean, random_std = evaluate(args, None, eval_seed)
    print(f"evaluation over {args.eval_episodes} episodes of 200 steps:")
    print(f"  trained (mean torque)   mean return {trained_mean:8.1f} (std {trained_std:.1f})")
    print(f"  uniform random torque   mean return {random_mean:8.1f} (std {random_std:.1f})")

    export(actor, MODEL_PATH)


if __name__ == "__main__":
    main()
