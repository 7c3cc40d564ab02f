"""Recurrent policies (issue 16): the cost of keeping each episode's state, and its memory.

A RecurrentPPO (sb3-contrib's MlpLstmPolicy with its default sizes: a 256-unit LSTM, 64×64 MLPs)
trained for a few steps on CartPole, imported with `generate.py import_sb3`, served by
`generate.py serve` on 127.0.0.1, against the same network without state (the LSTM fed zero
state inside the model, no `recurrent:` section): wrk at c=32, each request naming one of 1,024
live episodes in turn (the same query for both, so both parse the same requests). Then the RSS of
a server holding 100,000 episodes, and after each of 3 × 20,000 more (the store's bound,
`max_episodes: 100000`, evicts as many).

    python bench/recurrent.py                   # 10 s per round, 3 rounds; results to bench/results-recurrent.json
    python bench/recurrent.py --duration 3 --rounds 1 --out /tmp/r.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import run  # bench/run.py: wrk's command line, its parser and the RSS of a process tree
import torch
import yaml
from sb3_contrib import RecurrentPPO

from policy_server.cli import Commands
from policy_server.experience.episodes import AgentRef
from policy_server.loading import SCHEMA_FILE, load_policy_spec
from policy_server.recurrent.states import EpisodeStates
from policy_server.sb3 import RawObservations, RecurrentActor
from policy_server.schema import Recurrent, StateTensor

CONCURRENCY = 32
LIVE_EPISODES = 1024
HELD_EPISODES = 100_000
MORE_EPISODES = 20_000
BEYOND_ROUNDS = 3
BATCH = 1000  # episodes begun per /predict_batch while filling the store
OBSERVATION = [0.01, -0.02, 0.03, 0.04]
TARGET = 0.7


class ZeroState(torch.nn.Module):
    """The recurrent actor with zero state inside: the same network and math, nothing kept."""

    def __init__(self, actor: RecurrentActor, state_shape: tuple[int, int]) -> None:
        super().__init__()
        self.actor = actor
        self.state_shape = state_shape

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros((rows.shape[0], *self.state_shape))
        return self.actor(rows, zeros, zeros)[0]


def prepare(root: Path) -> tuple[Path, Path, Path]:
    """The recurrent policy (1,024+ episodes kept), its stateless twin, and one that keeps 100,000."""
    torch.set_num_threads(1)
    agent = RecurrentPPO("MlpLstmPolicy", "CartPole-v1", seed=0, device="cpu", n_steps=64, batch_size=64).learn(128)
    saved = root / "agent.zip"
    agent.save(saved)
    folders = {}
    for name, recurrent in (("recurrent", {"max_episodes": 10_000}), ("stateless", None), ("held", {"max_episodes": HELD_EPISODES})):
        folder = root / name
        Commands().import_sb3(str(saved), str(folder), name=name)
        document = yaml.safe_load((folder / SCHEMA_FILE).read_text())
        document["parameters"]["api_key"] = run.API_KEY
        if recurrent is None:
            del document["recurrent"]
            policy = agent.policy
            twin = ZeroState(
                RecurrentActor(RawObservations(policy.observation_space, None), policy),
                (policy.lstm_actor.num_layers, policy.lstm_actor.hidden_size),
            )
            torch.jit.save(torch.jit.trace(twin.eval(), torch.zeros(2, 4)), folder / "models" / "model.pt")
        else:
            document["recurrent"] |= recurrent
        (folder / SCHEMA_FILE).write_text(yaml.safe_dump(document, sort_keys=False))
        folders[name] = folder
    return folders["recurrent"], folders["stateless"], folders["held"]


@contextmanager
def serving(folder: Path) -> Iterator[tuple[str, int]]:
    port = run.free_port()
    command = [*run.SERVER_CORES, sys.executable, str(run.REPO / "generate.py"), "serve", "--directory", str(folder), "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            else:
                log.seek(0)
                raise RuntimeError(f"{folder.name} not ready: {log.read().decode(errors='replace')}")
            yield url, process.pid
        finally:
            run.stop(process)


def episodes_lua(body: Path) -> str:
    """Each request names the next of LIVE_EPISODES episodes: with 32 requests in flight, an
    episode's next step comes ~1,000 requests after its last was answered, never beside it."""
    return (
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["access-token"] = "{run.API_KEY}"\n'
        f'local f = io.open("{body}", "r"); wrk.body = f:read("*a"); f:close()\n'
        "local requests, n = {}, 0\n"
        "function init(args)\n"
        f'  for i = 0, {LIVE_EPISODES - 1} do requests[i + 1] = wrk.format(nil, wrk.path .. "?episode_id=e" .. i) end\n'
        "end\n"
        "function request()\n  n = n % #requests + 1\n  return requests[n]\nend\n"
    )


def load(url: str, seconds: int, scratch: Path) -> dict[str, float]:
    body, script = scratch / "body.json", scratch / "episodes.lua"
    body.write_text(json.dumps({"obs": OBSERVATION}))
    script.write_text(episodes_lua(body))
    command = [
        *run.WRK_CORE,
        "wrk",
        "-t1",
        f"-c{CONCURRENCY}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        f"{url}/predict_deterministic",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    result = run.parse_wrk(output)
    if not result["requests"]:  # kept, to tell a stalled server from a stalled load generator next time
        result["wrk_output"] = output  # type: ignore[assignment]
    return result


def throughput(recurrent: Path, stateless: Path, seconds: int, rounds: int, scratch: Path) -> dict[str, object]:
    """Median of `rounds` interleaved rounds per policy (the machine's noise hits both alike)."""
    runs: dict[str, list[dict[str, float]]] = {"recurrent": [], "stateless": []}
    for _ in range(rounds):
        for name, folder in (("recurrent", recurrent), ("stateless", stateless)):
            with serving(folder) as (url, pid):
                load(url, 2, scratch)  # warm: every episode exists, the allocator has settled
                result = load(url, seconds, scratch)
                result["rss_mib"] = run.tree_rss_mib(pid)
                if name == "recurrent":
                    result["episodes"] = httpx.get(f"{url}/info", headers={"access-token": run.API_KEY}, timeout=10).json()["recurrent"][
                        "episodes"
                    ]
                runs[name].append(result)
    numbers = ("requests_per_s", "requests", "p50_ms", "p99_ms", "errors", "rss_mib")
    median = {name: {key: statistics.median(r[key] for r in rs) for key in numbers} for name, rs in runs.items()}
    ratio = median["recurrent"]["requests_per_s"] / median["stateless"]["requests_per_s"]
    return {"median": median, "runs": runs, "ratio": ratio, "target": TARGET, "met": ratio >= TARGET}


def fill(url: str, first: int, count: int) -> None:
    """Begin `count` episodes, BATCH per /predict_batch (each observation names its own)."""
    with httpx.Client(base_url=url, headers={"access-token": run.API_KEY}, timeout=60) as client:
        for start in range(first, first + count, BATCH):
            body = {"observations": [{"obs": OBSERVATION, "episode_id": f"h{i}"} for i in range(start, start + BATCH)]}
            answer = client.post("/predict_batch", json=body, params={"deterministic": "true"})
            answer.raise_for_status()


def memory(held: Path) -> dict[str, object]:
    """RSS with 1,000 episodes, with 100,000 (the limit), then after each 20,000 more (as many evicted)."""
    with serving(held) as (url, pid):
        fill(url, 0, BATCH)
        rss = {BATCH: run.tree_rss_mib(pid)}
        fill(url, BATCH, HELD_EPISODES - BATCH)
        rss[HELD_EPISODES] = run.tree_rss_mib(pid)
        begun = HELD_EPISODES
        for _ in range(BEYOND_ROUNDS):
            fill(url, begun, MORE_EPISODES)
            begun += MORE_EPISODES
            rss[begun] = run.tree_rss_mib(pid)
        info = httpx.get(f"{url}/info", headers={"access-token": run.API_KEY}, timeout=10).json()["recurrent"]
    per_episode = (rss[HELD_EPISODES] - rss[BATCH]) * 1024 * 1024 / (HELD_EPISODES - BATCH)
    return {"rss_mib_by_episodes_begun": rss, "bytes_per_episode": per_episode, "store": info}


def store_alone(width: int) -> dict[int, float]:
    """This process's RSS (MiB) as an `EpisodeStates` of the server's sizes takes episodes, BATCH
    per step: the store's own memory, without a server's allocations beside it."""
    store = EpisodeStates(Recurrent((StateTensor("state", (width,)),), max_episodes=HELD_EPISODES), "bench")
    rss = {0: run.tree_rss_mib(os.getpid())}
    for begun in range(BATCH, HELD_EPISODES + BEYOND_ROUNDS * MORE_EPISODES + 1, BATCH):
        claim = store.claim([AgentRef(f"s{index}") for index in range(begun - BATCH, begun)], False, "1")
        store.keep(claim, np.ones((BATCH, width), np.float32), "1")
        if begun % MORE_EPISODES == 0:
            rss[begun] = run.tree_rss_mib(os.getpid())
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=run.BENCH / "results-recurrent.json")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recurrent-") as scratch_dir:
        scratch = Path(scratch_dir)
        recurrent, stateless, held = prepare(scratch)
        results = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "network": f"RecurrentPPO MlpLstmPolicy, LSTM {load_policy_spec(recurrent).recurrent.state[0].shape}",  # type: ignore[union-attr]
            "throughput": throughput(recurrent, stateless, arguments.duration, arguments.rounds, scratch),
            "memory": memory(held),
            "store_alone_rss_mib": store_alone(load_policy_spec(held).recurrent.width),  # type: ignore[union-attr]
        }
    arguments.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
