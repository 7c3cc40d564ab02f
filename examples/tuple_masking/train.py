"""Train the `tuple_masking` example policy: two action heads and an action mask, with PPO.

A dispatcher sends each arriving job to one of two machines (head `machine`: a, b) and picks the
speed to run it at (head `speed`: slow, normal, fast). Machine b is the big one: it works twice
as fast as machine a (the policy is not told; it learns it). Choices are not always allowed:

* a machine that is down cannot take jobs. When a machine breaks down, its waiting work is moved
  to the other machine, so a broken machine shows an empty queue: the most tempting choice is
  the forbidden one, and only the mask keeps the policy away from it;
* `fast` draws peak power, which the grid operator refuses at random times (30% of decisions).

The cost of a job is urgency x (time until it is done) + energy price x energy used. Slow runs
take twice as long and use half the energy of normal ones; fast runs take half as long and use
three times the energy. The reward is minus that cost, so the policy has to weigh queues,
urgency and the energy price.

The policy sees the schema's observations in schema order (10 columns):

    queue_lengths[2], job_size, urgency, energy_price, actionMask[5]

where actionMask = [machine a, machine b, slow, normal, fast] (1.0 allowed, 0.0 forbidden).
Run from the repository root:

    python examples/tuple_masking/train.py

It trains with the mask applied exactly as the server applies it (forbidden logits set to -inf
before each head's softmax), evaluates, and writes `models/model.pt2`: float32 [B, 10] →
the two heads' logits concatenated, [B, 2 + 3] (no softmax, no masking inside the model).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

MODEL_PATH = Path(__file__).resolve().parent / "models" / "model.pt2"
OBS_SIZE = 10
HEAD_SIZES = (2, 3)  # machine: a, b; speed: slow, normal, fast
MASK_COLUMNS = slice(5, 10)  # where actionMask sits in the observation row
MACHINE_RATE = np.array([1.0, 2.0])  # work done per time unit at normal speed: a, b
SPEED_FACTOR = np.array([0.5, 1.0, 2.0])  # slow, normal, fast: rate multiplier
ENERGY_PER_SIZE = np.array([0.5, 1.0, 3.0])  # energy used per unit of job size


@dataclass
class Args:
    seed: int = 1
    episode_length: int = 100  # jobs per episode
    max_queue: float = 10.0  # queues are capped (the schema's bound)
    break_prob: float = 0.05  # per step, for a running machine (only one is down at a time)
    repair_prob: float = 0.25  # per step, for a machine that is down
    fast_refused_prob: float = 0.3  # per decision, `fast` is forbidden
    # PPO
    total_timesteps: int = 400_000
    num_envs: int = 16
    num_steps: int = 128
    learning_rate: float = 1e-3
    gamma: float = 0.95
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    # evaluation
    eval_episodes: int = 100


class JobDispatch:
    """`num_envs` independent dispatch problems stepped together (numpy, auto-reset)."""

    def __init__(self, num_envs: int, args: Args, seed: int) -> None:
        self.n = num_envs
        self.args = args
        self.rng = np.random.default_rng(seed)
        self.queue = np.zeros((num_envs, 2))
        self.up = np.ones((num_envs, 2), dtype=bool)
        self.fast_allowed = np.ones(num_envs, dtype=bool)
        self.job_size = np.ones(num_envs)
        self.urgency = np.zeros(num_envs)
        self.price = np.zeros(num_envs)
        self.t = np.zeros(num_envs, dtype=np.int64)

    def _new_job(self) -> None:
        """Draw the next job, the energy price and whether `fast` is allowed, in every env."""
        self.job_size = self.rng.uniform(0.5, 1.5, self.n)
        self.urgency = self.rng.uniform(0.0, 1.0, self.n)
        self.price = self.rng.uniform(0.0, 1.0, self.n)
        self.fast_allowed = self.rng.random(self.n) >= self.args.fast_refused_prob

    def mask(self) -> np.ndarray:
        """[machine a, machine b, slow, normal, fast]; slow and normal are always allowed."""
        always = np.ones((self.n, 2), dtype=bool)
        return np.concatenate([self.up, always, self.fast_allowed[:, None]], axis=1)

    def observe(self) -> np.ndarray:
        features = np.stack([self.job_size, self.urgency, self.price], axis=1)
        return np.concatenate([self.queue, features, self.mask()], axis=1).astype(np.float32)

    def reset(self) -> np.ndarray:
        self.queue[:] = 0.0
        self.up[:] = True
        self.t[:] = 0
        self._new_job()
        return self.observe()

    def step(self, machine: np.ndarray, speed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dispatch the current job in every env. Returns (next obs, reward, done, final obs).

        `final obs` is the observation an episode ended on (before the auto-reset), for
        bootstrapping the value of a time-limit cut.
        """
        rows = np.arange(self.n)
        assert self.mask()[rows, machine].all() and self.mask()[rows, 2 + speed].all(), "a forbidden action was taken"

        # Queues are in time units (time until the machine is free). The job's cost:
        # urgency x (wait + its own run time) + energy price x energy used.
        run_time = self.job_size / (MACHINE_RATE[machine] * SPEED_FACTOR[speed])
        done_at = self.queue[rows, machine] + run_time
        reward = -(self.urgency * done_at + self.price * ENERGY_PER_SIZE[speed] * self.job_size)
        self.queue[rows, machine] = np.minimum(done_at, self.args.max_queue)

        # One time unit passes: running machines work off one time unit of their queue.
        self.queue = np.where(self.up, np.maximum(self.queue - 1.0, 0.0), self.queue)

        # Repairs, then breakdowns (never both machines down at once).
        self.up |= self.rng.random((self.n, 2)) < self.args.repair_prob
        breaks = self.up & self.up[:, ::-1] & (self.rng.random((self.n, 2)) < self.args.break_prob)
        breaks[:, 1] &= ~breaks[:, 0]
        for m in (0, 1):
            # A broken machine's waiting work moves to the other one (converted to its pace).
            moved = np.where(breaks[:, m], self.queue[:, m], 0.0)
            moved_time = moved * MACHINE_RATE[m] / MACHINE_RATE[1 - m]
            self.queue[:, 1 - m] = np.minimum(self.queue[:, 1 - m] + moved_time, self.args.max_queue)
            self.queue[:, m] -= moved
        self.up &= ~breaks

        self._new_job()
        self.t += 1
        done = self.t >= self.args.episode_length
        final_obs = self.observe()
        if done.any():
            self.queue[done] = 0.0
            self.up[done] = True
            self.t[done] = 0
        return self.observe(), reward.astype(np.float32), done, final_obs


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Actor(nn.Module):
    """The served policy: observations [B, 10] → logits of both heads, concatenated [B, 5]."""

    def __init__(self) -> None:
        super().__init__()
        # Fixed input scale: queues (0..10) to 0..1; the other columns are already about 0..1.
        scale = torch.ones(OBS_SIZE)
        scale[0:2] = 10.0
        self.register_buffer("obs_scale", scale)
        self.net = nn.Sequential(
            layer_init(nn.Linear(OBS_SIZE, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, sum(HEAD_SIZES)), std=0.01),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs / self.obs_scale)


class Critic(nn.Module):
    """The value function, used only in training."""

    def __init__(self) -> None:
        super().__init__()
        scale = torch.ones(OBS_SIZE)
        scale[0:2] = 10.0
        self.register_buffer("obs_scale", scale)
        self.net = nn.Sequential(
            layer_init(nn.Linear(OBS_SIZE, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs / self.obs_scale).squeeze(-1)


def masked_heads(logits: torch.Tensor, obs: torch.Tensor) -> list[Categorical]:
    """One categorical per head, with forbidden actions' logits set to -inf (as the server does)."""
    allowed = obs[:, MASK_COLUMNS] > 0.5
    masked = logits.masked_fill(~allowed, float("-inf"))
    return [Categorical(logits=head) for head in masked.split(HEAD_SIZES, dim=1)]


def train(args: Args) -> Actor:
    actor, critic = Actor(), Critic()
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=args.learning_rate, eps=1e-5)
    env = JobDispatch(args.num_envs, args, seed=args.seed)

    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size

    obs_buf = torch.zeros((args.num_steps, args.num_envs, OBS_SIZE))
    actions_buf = torch.zeros((args.num_steps, args.num_envs, 2), dtype=torch.long)
    logprobs_buf = torch.zeros((args.num_steps, args.num_envs))
    rewards_buf = torch.zeros((args.num_steps, args.num_envs))
    dones_buf = torch.zeros((args.num_steps, args.num_envs))
    values_buf = torch.zeros((args.num_steps, args.num_envs))

    next_obs = torch.from_numpy(env.reset())
    next_done = torch.zeros(args.num_envs)
    episode_returns = np.zeros(args.num_envs)
    finished_returns: list[float] = []

    for iteration in range(1, num_iterations + 1):
        optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1) / num_iterations) * args.learning_rate

        # 1. Collect a rollout. The joint action's log-probability is the sum over the heads.
        for step in range(args.num_steps):
            obs_buf[step] = next_obs
            dones_buf[step] = next_done
            with torch.no_grad():
                heads = masked_heads(actor(next_obs), next_obs)
                action = torch.stack([head.sample() for head in heads], dim=1)
                logprobs_buf[step] = sum(head.log_prob(action[:, i]) for i, head in enumerate(heads))
                values_buf[step] = critic(next_obs)
            actions_buf[step] = action

            obs_np, reward, done, final_obs = env.step(action[:, 0].numpy(), action[:, 1].numpy())
            episode_returns += reward
            finished_returns.extend(episode_returns[done].tolist())
            episode_returns[done] = 0.0
            if done.any():
                # Episodes end only by the time limit, so bootstrap: the future did not stop.
                with torch.no_grad():
                    final_values = critic(torch.from_numpy(final_obs[done])).numpy()
                reward = reward.copy()
                reward[done] += args.gamma * final_values
            rewards_buf[step] = torch.from_numpy(reward)
            next_obs, next_done = torch.from_numpy(obs_np), torch.from_numpy(done.astype(np.float32))

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
        b_actions = actions_buf.reshape(-1, 2)
        b_logprobs = logprobs_buf.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        for _ in range(args.update_epochs):
            for mb in torch.randperm(batch_size).split(minibatch_size):
                heads = masked_heads(actor(b_obs[mb]), b_obs[mb])
                new_logprob = sum(head.log_prob(b_actions[mb, i]) for i, head in enumerate(heads))
                entropy = sum(head.entropy() for head in heads)
                ratio = (new_logprob - b_logprobs[mb]).exp()
                mb_adv = b_advantages[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_loss = 0.5 * ((critic(b_obs[mb]) - b_returns[mb]) ** 2).mean()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], args.max_grad_norm)
                optimizer.step()

        if iteration % 20 == 0 or iteration == num_iterations:
            recent = np.mean(finished_returns[-100:]) if finished_returns else float("nan")
            print(f"iteration {iteration}/{num_iterations}  steps {iteration * batch_size}  mean return (last 100 episodes) {recent:.2f}")
    return actor


def evaluate(args: Args, policy: str, actor: Actor, seed: int) -> tuple[float, float]:
    """Play `eval_episodes` episodes with one policy:

    * "trained": the most likely allowed action of each head (as /predict_deterministic);
    * "random": a uniformly random allowed action of each head;
    * "shortest_queue": the allowed machine with less work waiting, at normal speed.

    Returns (mean episode return, the share of decisions where the trained policy's favourite
    action, with the mask ignored, would have been forbidden; 0 for the other policies).
    """
    env = JobDispatch(1, args, seed=seed)
    rng = np.random.default_rng(seed + 1)
    obs = env.reset()
    returns, forbidden = [], []
    for _ in range(args.eval_episodes):
        total = 0.0
        for _ in range(args.episode_length):
            mask = obs[0, MASK_COLUMNS] > 0.5
            if policy == "trained":
                with torch.no_grad():
                    logits = actor(torch.from_numpy(obs))
                heads = masked_heads(logits, torch.from_numpy(obs))
                machine, speed = (int(head.probs.argmax()) for head in heads)
                unmasked = [int(h.argmax()) for h in logits[0].split(HEAD_SIZES)]
                forbidden.append(not (mask[unmasked[0]] and mask[2 + unmasked[1]]))
            elif policy == "random":
                machine = int(rng.choice(np.flatnonzero(mask[:2])))
                speed = int(rng.choice(np.flatnonzero(mask[2:])))
            else:
                queues = np.where(mask[:2], obs[0, :2], np.inf)
                machine, speed = int(queues.argmin()), 1
            obs, reward, _, _ = env.step(np.array([machine]), np.array([speed]))
            total += float(reward[0])
        returns.append(total)
    return float(np.mean(returns)), float(np.mean(forbidden)) if forbidden else 0.0


def export(actor: Actor, path: Path) -> None:
    """Save the actor as a torch.export program with a dynamic batch dimension, then check it."""
    actor = actor.eval()
    example_obs = torch.zeros((2, OBS_SIZE), dtype=torch.float32)  # batch 2 keeps the dim dynamic
    program = torch.export.export(actor, (example_obs,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)

    loaded = torch.export.load(path).module()
    for batch in (1, 100):
        obs = torch.rand((batch, OBS_SIZE))
        out = loaded(obs)
        assert out.shape == (batch, sum(HEAD_SIZES)), out.shape
        assert torch.allclose(out, actor(obs), atol=1e-5)
    print(f"saved {path} (input [B, {OBS_SIZE}] -> logits [B, {sum(HEAD_SIZES)}]; checked batches of 1 and 100)")


def main() -> None:
    args = Args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    start = time.perf_counter()
    actor = train(args)
    train_seconds = time.perf_counter() - start
    print(f"training took {train_seconds:.0f} s for {args.total_timesteps} steps (seed {args.seed})")

    # Every policy meets the same jobs, prices and breakdowns (same env seed).
    eval_seed = 12345
    trained, forbidden = evaluate(args, "trained", actor, eval_seed)
    random, _ = evaluate(args, "random", actor, eval_seed)
    heuristic, _ = evaluate(args, "shortest_queue", actor, eval_seed)
    print(f"evaluation over {args.eval_episodes} episodes of {args.episode_length} jobs (return = minus total cost):")
    print(f"  trained (greedy, masked)        mean return {trained:8.2f}")
    print(f"  uniform random allowed actions  mean return {random:8.2f}")
    print(f"  shortest allowed queue, normal  mean return {heuristic:8.2f}")
    print(f"  with the mask ignored, the trained policy's favourite action would be forbidden in {forbidden:.1%} of decisions")

    export(actor, MODEL_PATH)


if __name__ == "__main__":
    main()
