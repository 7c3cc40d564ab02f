"""`python generate.py export_minari`: an experience log written by hand to records.py's layout,
exported by the real command, reopened with `minari.load_dataset` and compared episode by episode."""

import math
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import MOUSE_SCHEMA, MakePolicyDir, mlp
from servers import REPO, generate, run

from policy_server.experience.records import OUTCOME_SCHEMA, OUTCOMES, STEPS, step_schema
from policy_server.loading import load_policy_spec
from policy_server.schema import PolicySpec

EXAMPLES = REPO / "examples"
START = datetime(2025, 6, 30, 12, 0, tzinfo=UTC)
EXPERIENCE = "\nexperience: {dir: experience}\n"


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


@dataclass
class Step:
    episode_id: str
    time: datetime
    observation: list[float]
    actions: list[float]
    agent_id: str = ""
    version: str = "1"
    process: str = "host:1"
    probability: float | None = 0.5
    log_probability: float | None = math.log(0.5)
    deterministic: bool = False


@dataclass
class Outcome:
    episode_id: str
    time: datetime
    reward: float
    agent_id: str = ""
    terminated: bool = False
    truncated: bool = False
    final_observation: list[float] | None = None
    process: str = "host:1"


@dataclass
class ExperienceLog:
    """Writes steps and outcomes as the server lays them out: one file per process and partition,
    each step's `step` counted per process, as each process sees the episode."""

    spec: PolicySpec
    root: Path
    steps: list[Step] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def step(self, *args: Any, **kwargs: Any) -> Step:
        step = Step(*args, **kwargs)
        self.steps.append(step)
        return step

    def outcome(self, *args: Any, **kwargs: Any) -> Outcome:
        outcome = Outcome(*args, **kwargs)
        self.outcomes.append(outcome)
        return outcome

    def write(self) -> None:
        counters: dict[tuple[str, str, str], int] = defaultdict(int)
        step_files: dict[Path, list[dict[str, Any]]] = defaultdict(list)
        for step in sorted(self.steps, key=lambda s: s.time):
            key = (step.process, step.episode_id, step.agent_id)
            folder = self.root / STEPS / f"policy={self.spec.name}" / f"version={step.version}" / f"date={step.time.date()}"
            step_files[folder / f"{step.process.replace(':', '-')}.parquet"].append(self._step_row(step, counters[key]))
            counters[key] += 1
        for path, rows in step_files.items():
            _write(path, pa.Table.from_pylist(rows, schema=step_schema(self.spec)))
        outcome_files: dict[Path, list[dict[str, Any]]] = defaultdict(list)
        for outcome in self.outcomes:
            folder = self.root / OUTCOMES / f"policy={self.spec.name}" / f"date={outcome.time.date()}"
            outcome_files[folder / f"{outcome.process.replace(':', '-')}.parquet"].append(_outcome_row(outcome))
        for path, rows in outcome_files.items():
            _write(path, pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA))

    def _step_row(self, step: Step, index: int) -> dict[str, Any]:
        row = {
            "episode_id": step.episode_id,
            "agent_id": step.agent_id,
            "step": index,
            "time": step.time,
            "observation": step.observation,
            "actions": step.actions,
            "probability": step.probability,
            "log_probability": step.log_probability,
            "head_probabilities": None,
            "head_log_probabilities": None,
            "mask": None,
            "deterministic": step.deterministic,
            "process": step.process,
        }
        if self.spec.observations:
            row["fields"] = self._fields(step.observation)
        return row

    def _fields(self, observation: list[float]) -> dict[str, Any]:
        cast = {"int": int, "float": float, "bool": bool}
        values = {}
        for obs in self.spec.observations or ():
            columns = self.spec.columns_of(obs.name)
            assert columns is not None
            typed = [cast[obs.kind](value) for value in observation[columns]]
            values[obs.name] = typed if obs.is_list else typed[0]
        return values


def _outcome_row(outcome: Outcome) -> dict[str, Any]:
    return {
        "episode_id": outcome.episode_id,
        "agent_id": outcome.agent_id,
        "time": outcome.time,
        "version": None,
        "step": None,
        "reward": outcome.reward,
        "terminated": outcome.terminated,
        "truncated": outcome.truncated,
        "final_observation": outcome.final_observation,
        "info": None,
    }


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def policy_folder(parent: Path, example: str, extra: str = EXPERIENCE) -> Path:
    """The example's schema.yaml (the export needs no model when it declares its actions), logging to experience/."""
    folder = parent / example
    folder.mkdir(parents=True)
    (folder / "schema.yaml").write_text((EXAMPLES / example / "schema.yaml").read_text() + extra)
    return folder


def log_of(folder: Path) -> ExperienceLog:
    return ExperienceLog(load_policy_spec(folder), folder / "experience")


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    return tmp_path / "minari-datasets"


def export(datasets: Path, dataset_id: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the command; its summary (stdout), after checking it succeeded quietly."""
    result = generate("export_minari", dataset_id, *args, env={"MINARI_DATASETS_PATH": str(datasets), **(env or {})})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    return result.stdout


def load(datasets: Path, dataset_id: str) -> minari.MinariDataset:
    os.environ["MINARI_DATASETS_PATH"] = str(datasets)
    try:
        return minari.load_dataset(dataset_id)
    finally:
        del os.environ["MINARI_DATASETS_PATH"]


def episodes(dataset: minari.MinariDataset) -> Iterator[tuple[dict[str, Any], minari.EpisodeData]]:
    """(metadata, episode) of each episode, in the dataset's order."""
    metadata = list(dataset.storage.get_episode_metadata(range(dataset.total_episodes)))
    return zip(metadata, dataset.iterate_episodes(), strict=True)


def assert_episode(
    episode: minari.EpisodeData,
    steps: Sequence[Step],
    final_observation: Sequence[float],
    rewards: Sequence[float],
    terminated: bool = False,
    truncated: bool = False,
) -> None:
    """The episode is these steps' decisions, then `final_observation`, with these summed rewards."""
    assert len(episode) == len(steps) == len(rewards)
    expected_observations = np.array([*(step.observation for step in steps), final_observation], dtype=np.float32)
    np.testing.assert_array_equal(episode.observations, expected_observations)
    np.testing.assert_allclose(episode.rewards, rewards, rtol=0, atol=1e-12)
    assert episode.terminations.tolist() == [False] * (len(steps) - 1) + [terminated]
    assert episode.truncations.tolist() == [False] * (len(steps) - 1) + [truncated]
    infos = episode.infos
    nan = float("nan")
    np.testing.assert_array_equal(infos["probability"], [*(nan if s.probability is None else s.probability for s in steps), nan])
    np.testing.assert_array_equal(
        infos["log_probability"], [*(nan if s.log_probability is None else s.log_probability for s in steps), nan]
    )
    assert infos["version"].tolist() == [*(step.version for step in steps), ""]
    assert infos["deterministic"].tolist() == [*(step.deterministic for step in steps), False]


def mouse_row(mouse: tuple[int, int], cheese: tuple[int, int]) -> list[float]:
    return [mouse[0], mouse[1], cheese[0] - mouse[0], cheese[1] - mouse[1], cheese[0], cheese[1]]


def test_discrete_episodes_come_back_as_logged(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    log = log_of(folder)
    first = [
        log.step("e1", at(0), mouse_row((0, 0), (2, 1)), [1], probability=0.5, log_probability=math.log(0.5)),
        log.step("e1", at(1), mouse_row((1, 0), (2, 1)), [1], probability=0.25, log_probability=math.log(0.25)),
        log.step("e1", at(2), mouse_row((2, 0), (2, 1)), [3], probability=0.9, log_probability=math.log(0.9)),
    ]
    log.outcome("e1", at(0.5), -0.1)
    log.outcome("e1", at(1.2), -0.1)
    log.outcome("e1", at(1.4), 0.3)  # two outcomes of one step: their rewards add up
    log.outcome("e1", at(2.1), 1.0, terminated=True, final_observation=mouse_row((2, 1), (2, 1)))
    second = [
        log.step("e2", at(10), mouse_row((5, 5), (0, 0)), [0], version="2", deterministic=True),
        log.step("e2", at(11), mouse_row((4, 5), (0, 0)), [2], version="2", deterministic=True),
    ]
    log.outcome("e2", at(11), 0.5, truncated=True)  # at the very time of its step: that step's; no final observation
    log.write()

    summary = export(datasets, "mouse/served-v0", "--directory", str(folder))

    assert f"to Minari dataset mouse/served-v0 at {datasets / 'mouse' / 'served-v0'}" in summary
    assert "episodes: 2, steps: 5" in summary
    assert "skipped: 0" in summary
    assert "outcomes matching no step, ignored: 0" in summary
    assert "(their last observation repeated): 1" in summary
    dataset = load(datasets, "mouse/served-v0")
    assert dataset.action_space == gym.spaces.Discrete(4)
    assert dataset.observation_space == gym.spaces.Box(
        np.array([0, 0, -5, -5, 0, 0], dtype=np.float32), np.array([5] * 6, dtype=np.float32), dtype=np.float32
    )
    (meta1, ep1), (meta2, ep2) = episodes(dataset)
    assert (meta1["episode_id"], meta1["agent_id"], meta1["start"]) == ("e1", "", at(0).isoformat())
    assert_episode(ep1, first, mouse_row((2, 1), (2, 1)), [-0.1, -0.1 + 0.3, 1.0], terminated=True)
    assert ep1.actions.dtype == np.int64 and ep1.actions.tolist() == [1, 1, 3]
    assert meta2["episode_id"] == "e2"
    assert_episode(ep2, second, second[-1].observation, [0.0, 0.5], truncated=True)
    assert ep2.actions.tolist() == [0, 2]


def test_continuous_actions(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "pendulum")
    log = log_of(folder)
    steps = [
        log.step("swing", at(0), [1.0, 0.0, 0.5], [0.75], probability=None, log_probability=-1.25),
        # theta_dot below its minimum -8: a row sent to /predict_raw, which checks no bounds
        log.step("swing", at(1), [0.5, 0.8, -9.5], [-2.0], probability=None, log_probability=None, deterministic=True),
    ]
    log.outcome("swing", at(0.1), -1.5)
    log.outcome("swing", at(1.1), -0.5, truncated=True, final_observation=[0.0, 1.0, 8.0])
    log.write()

    export(datasets, "pendulum/served-v1", "--directory", str(folder))

    dataset = load(datasets, "pendulum/served-v1")
    assert dataset.action_space == gym.spaces.Box(-2.0, 2.0, (1,), dtype=np.float32)
    low, high = np.array([-1, -1, -np.inf], np.float32), np.array([1, 1, 8], np.float32)  # theta_dot's minimum dropped
    assert dataset.observation_space == gym.spaces.Box(low, high, dtype=np.float32)
    ((_, episode),) = episodes(dataset)
    assert_episode(episode, steps, [0.0, 1.0, 8.0], [-1.5, -0.5], truncated=True)
    assert episode.actions.dtype == np.float32
    np.testing.assert_array_equal(episode.actions, [[0.75], [-2.0]])


def test_several_discrete_heads_and_a_mask(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "tuple_masking")
    log = log_of(folder)
    mask = [1.0, 0.0, 1.0, 1.0, 0.0]
    steps = [
        log.step("jobs", at(0), [0.0, 2.5, 1.0, 0.5, 0.25, *mask], [0, 2], probability=0.3, log_probability=math.log(0.3)),
        log.step("jobs", at(1), [1.0, 2.0, 0.5, 1.0, 1.0, 1, 1, 1, 1, 1], [1, 1], probability=0.6, log_probability=math.log(0.6)),
    ]
    log.outcome("jobs", at(1.5), -2.0, terminated=True, final_observation=[0.0, 0.0, 1.5, 0.0, 0.0, *mask])
    log.write()

    export(datasets, "tuple-v0", "--directory", str(folder))

    dataset = load(datasets, "tuple-v0")
    assert dataset.action_space == gym.spaces.MultiDiscrete([2, 3])
    low = np.array([0, 0, 0.5, 0, 0, 0, 0, 0, 0, 0], np.float32)
    high = np.array([10, 10, 1.5, 1, 1, 1, 1, 1, 1, 1], np.float32)
    assert dataset.observation_space == gym.spaces.Box(low, high, dtype=np.float32)
    ((_, episode),) = episodes(dataset)
    assert_episode(episode, steps, [0.0, 0.0, 1.5, 0.0, 0.0, *mask], [0.0, -2.0], terminated=True)
    assert episode.actions.dtype == np.int64 and episode.actions.tolist() == [[0, 2], [1, 1]]


def test_two_agents_of_one_episode_become_two_episodes(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    log = log_of(folder)
    red = [log.step("match", at(0), mouse_row((0, 0), (3, 3)), [1], agent_id="red")]
    blue = [log.step("match", at(0.5), mouse_row((5, 5), (3, 3)), [0], agent_id="blue")]
    red.append(log.step("match", at(1), mouse_row((1, 0), (3, 3)), [3], agent_id="red"))
    blue.append(log.step("match", at(1.5), mouse_row((4, 5), (3, 3)), [2], agent_id="blue"))
    log.outcome("match", at(0.7), 1.0, agent_id="blue")
    log.outcome("match", at(0.8), 2.0, agent_id="red")  # the red agent's first step's, though blue stepped since
    log.outcome("match", at(1.6), 4.0, agent_id="red", terminated=True)
    log.outcome("match", at(1.7), 8.0, agent_id="blue", terminated=True)
    log.write()

    export(datasets, "match-v0", "--directory", str(folder))

    found = {meta["agent_id"]: (meta, episode) for meta, episode in episodes(load(datasets, "match-v0"))}
    assert sorted(found) == ["blue", "red"]
    assert found["red"][0]["episode_id"] == found["blue"][0]["episode_id"] == "match"
    assert_episode(found["red"][1], red, red[-1].observation, [2.0, 4.0], terminated=True)
    assert_episode(found["blue"][1], blue, blue[-1].observation, [1.0, 8.0], terminated=True)


def test_rewards_find_their_steps_by_time_across_processes(tmp_path: Path, datasets: Path) -> None:
    """Two API processes served one episode in turns (each counting its own steps from 0), and
    each received the outcome of a step the other served: the order is (time, step), the join by time."""
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    log = log_of(folder)
    servers = ["a:1", "a:1", "b:2", "a:1"]  # b:2 counts its step as 0, a:1 its last as 2
    steps = [log.step("shared", at(t), mouse_row((t, 0), (5, 5)), [t % 4], process=server) for t, server in enumerate(servers)]
    for t, reward in enumerate([1.0, 2.0, 4.0]):
        log.outcome("shared", at(t + 0.5), reward, process="b:2" if t % 2 == 0 else "a:1")
    log.outcome("shared", at(3.5), 8.0, terminated=True, final_observation=mouse_row((5, 5), (5, 5)), process="b:2")
    log.write()

    export(datasets, "shared-v0", "--directory", str(folder))

    ((_, episode),) = episodes(load(datasets, "shared-v0"))
    assert_episode(episode, steps, mouse_row((5, 5), (5, 5)), [1.0, 2.0, 4.0, 8.0], terminated=True)
    assert episode.actions.tolist() == [0, 1, 2, 3]


def test_an_episode_id_used_again_after_its_end_is_a_new_episode(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    log = log_of(folder)
    first = [log.step("again", at(t), mouse_row((t, 0), (5, 0)), [1]) for t in (0, 1)]
    log.outcome("again", at(1.5), 1.0, terminated=True)
    second = [log.step("again", at(t), mouse_row((0, t), (0, 5)), [3]) for t in (5, 6)]
    log.outcome("again", at(5.5), 0.25)
    log.outcome("again", at(6.5), 2.0, truncated=True)
    log.write()

    export(datasets, "again-v0", "--directory", str(folder))

    (meta1, ep1), (meta2, ep2) = episodes(load(datasets, "again-v0"))
    assert meta1["episode_id"] == meta2["episode_id"] == "again"
    assert (meta1["start"], meta2["start"]) == (at(0).isoformat(), at(5).isoformat())
    assert_episode(ep1, first, first[-1].observation, [0.0, 1.0], terminated=True)
    assert_episode(ep2, second, second[-1].observation, [0.25, 2.0], truncated=True)


def test_unfinished_episodes_are_skipped_or_included_truncated(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    log = log_of(folder)
    done = [log.step("done", at(0), mouse_row((0, 0), (0, 1)), [3])]
    log.outcome("done", at(0.5), 1.0, terminated=True)
    running = [log.step("running", at(1 + t), mouse_row((t, 3), (5, 3)), [1]) for t in range(3)]
    for t in range(3):
        log.outcome("running", at(1.5 + t), 2.0**t)
    log.step("lone", at(2), mouse_row((3, 3), (0, 0)), [0])  # one step and no end: nothing to include
    log.write()

    summary = export(datasets, "skipped-v0", "--directory", str(folder))
    assert "episodes: 1, steps: 1" in summary
    assert "unfinished episodes (no outcome ended them) skipped: 2" in summary
    ((meta, _),) = episodes(load(datasets, "skipped-v0"))
    assert meta["episode_id"] == "done"

    summary = export(datasets, "included-v0", "--directory", str(folder), "--include_unfinished")
    assert "episodes: 2, steps: 3" in summary
    assert (
        "unfinished episodes (no outcome ended them): 1 included, truncated before their last step; 1 of a single step skipped" in summary
    )
    (_, ep_done), (meta, ep_running) = episodes(load(datasets, "included-v0"))
    assert_episode(ep_done, done, done[0].observation, [1.0], terminated=True)
    assert meta["episode_id"] == "running"
    assert_episode(ep_running, running[:2], running[2].observation, [1.0, 2.0], truncated=True)


def test_outcomes_without_a_step_are_counted_not_rewarded(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    log = log_of(folder)
    log.outcome("e", at(0), 100.0)  # before the episode's first step
    steps = [log.step("e", at(1), mouse_row((0, 0), (0, 1)), [3])]
    log.outcome("e", at(1.5), 1.0, terminated=True)
    log.outcome("e", at(1.7), 100.0, terminated=True)  # after its end
    log.outcome("ghost", at(2), 100.0)  # an episode that has no step at all
    log.write()

    summary = export(datasets, "unmatched-v0", "--directory", str(folder))

    assert "outcomes matching no step, ignored: 3" in summary
    ((_, episode),) = episodes(load(datasets, "unmatched-v0"))
    assert_episode(episode, steps, steps[0].observation, [1.0], terminated=True)


@pytest.fixture
def dated_log(tmp_path: Path) -> Path:
    """Episodes a (version 1), d (1, started a minute before b, running past it), b (2) and c (2,
    the next day), one ended step each but d's two."""
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    log = log_of(folder)
    for name, start, version in (("a", -7200, "1"), ("d", -60, "1"), ("b", 0, "2"), ("c", 86400 - 3 * 3600, "2")):
        log.step(name, at(start), mouse_row((0, 0), (0, 1)), [3], version=version)
        if name == "d":
            log.step(name, at(1800), mouse_row((0, 1), (0, 1)), [3], version=version)
        log.outcome(name, at(max(start, 1800) + 1), 1.0, terminated=True)
    log.write()
    return folder


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--version", "2"], ["b", "c"]),
        (["--version", "1"], ["a", "d"]),
        (["--since", "2025-06-30T12:00:00"], ["b", "c"]),  # no timezone: UTC
        (["--until", "2025-06-30T14:00:00+02:00"], ["a", "d"]),  # 12:00 UTC, not included
        (["--since", "2025-06-30T11:00Z", "--until", "2025-07-01"], ["d", "b"]),
        (["--since", "2025-06-30T12:00:00", "--version", "1"], None),
    ],
)
def test_version_and_time_filters_choose_by_the_first_step(
    dated_log: Path, datasets: Path, options: list[str], expected: list[str] | None
) -> None:
    result = generate("export_minari", "dated-v0", "--directory", str(dated_log), *options, env={"MINARI_DATASETS_PATH": str(datasets)})
    if expected is None:
        assert result.returncode == 1 and "no episode to export" in result.stderr, result.stderr
        assert not (datasets / "dated-v0").exists()
        return
    assert result.returncode == 0, result.stderr
    assert [meta["episode_id"] for meta, _ in episodes(load(datasets, "dated-v0"))] == expected


def test_the_environment_names_the_log_and_files_being_written_are_skipped(tmp_path: Path, datasets: Path) -> None:
    folder = policy_folder(tmp_path, "mouse_and_cheese", extra="")
    log = ExperienceLog(load_policy_spec(folder), tmp_path / "elsewhere")
    steps = [log.step("e", at(0), mouse_row((0, 0), (0, 1)), [3])]
    log.outcome("e", at(1), 1.0, terminated=True)
    log.write()
    partition = next((log.root / STEPS).glob("*/*/*"))
    (partition / ".host-1.parquet.tmp").write_bytes(b"half a file")
    (partition / "_host-2.parquet").write_bytes(b"PAR1 half a file")

    export(datasets, "elsewhere-v0", "--directory", str(folder), env={"POLICY_SERVER_EXPERIENCE_DIR": str(log.root)})

    ((_, episode),) = episodes(load(datasets, "elsewhere-v0"))
    assert_episode(episode, steps, steps[0].observation, [1.0], terminated=True)


def test_heads_are_read_from_the_model_when_the_schema_declares_none(make_policy_dir: MakePolicyDir, datasets: Path) -> None:
    schema = MOUSE_SCHEMA.split("actions:")[0] + EXPERIENCE
    folder = make_policy_dir(schema, mlp(6, 3), 6)
    log = log_of(folder)
    log.step("e", at(0), mouse_row((0, 0), (0, 1)), [2])
    log.outcome("e", at(1), 1.0, terminated=True)
    log.write()

    export(datasets, "model-heads-v0", "--directory", str(folder))

    assert load(datasets, "model-heads-v0").action_space == gym.spaces.Discrete(3)


def test_a_repository_exports_the_policy_chosen(tmp_path: Path, datasets: Path) -> None:
    root = tmp_path / "policies"
    mouse_log = log_of(policy_folder(root, "mouse_and_cheese"))
    mouse_log.step("m", at(0), mouse_row((0, 0), (0, 1)), [3])
    mouse_log.outcome("m", at(1), 1.0, terminated=True)
    mouse_log.write()
    pendulum_log = log_of(policy_folder(root, "pendulum"))
    pendulum_log.step("p", at(0), [1.0, 0.0, 0.0], [0.5])
    pendulum_log.outcome("p", at(1), 1.0, terminated=True)
    pendulum_log.write()
    policy_folder(root, "tuple_masking", extra="")  # does not log

    export(datasets, "pendulum-v0", "--directory", str(root), "--policy", "pendulum")

    ((meta, _),) = episodes(load(datasets, "pendulum-v0"))
    assert meta["episode_id"] == "p"
    shutil.rmtree(root / "mouse_and_cheese")
    export(datasets, "only-v0", "--directory", str(root))  # the one policy left that logs
    assert load(datasets, "only-v0").action_space == gym.spaces.Box(-2.0, 2.0, (1,), dtype=np.float32)


def test_mistakes_fail_in_one_line(tmp_path: Path, datasets: Path) -> None:
    root = tmp_path / "policies"
    mouse = policy_folder(root, "mouse_and_cheese")
    log = log_of(mouse)
    log.step("m", at(0), mouse_row((0, 0), (0, 1)), [3])
    log.outcome("m", at(1), 1.0, terminated=True)
    log.write()
    empty = policy_folder(root, "pendulum")  # logs, but nothing was logged yet
    policy_folder(root, "tuple_masking", extra="")  # does not log
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    short = log_of(policy_folder(tmp_path / "short", "mouse_and_cheese"))
    short.step("s", at(0), mouse_row((0, 0), (0, 1)), [3])
    short.outcome("s", at(1), 1.0, terminated=True, final_observation=[0.0, 1.0])
    short.write()
    export(datasets, "taken-v0", "--directory", str(mouse))
    cases = {
        "several": (["fresh-v0", "--directory", str(root)], ["several policies log experience: mouse_and_cheese, pendulum", "--policy"]),
        "unknown": (["fresh-v0", "--directory", str(root), "--policy", "nope"], ["'nope'", "mouse_and_cheese, pendulum, tuple_masking"]),
        "not logged": (["fresh-v0", "--directory", str(root), "--policy", "tuple_masking"], ["does not log", "experience"]),
        "no log": (["fresh-v0", "--directory", str(empty)], [str(empty / "experience" / STEPS / "policy=pendulum"), "no steps"]),
        "no policy": (["fresh-v0", "--directory", str(nowhere)], ["schema.yaml", "not found"]),
        "bad time": (["fresh-v0", "--directory", str(mouse), "--since", "yesterday"], ["--since", "'yesterday'", "ISO 8601"]),
        "taken": (["taken-v0", "--directory", str(mouse)], ["taken-v0", "exists already", "minari delete"]),
        "bad id": (["no version", "--directory", str(mouse)], ["DATASET_ID", "name-vN"]),
        "short final": (["fresh-v0", "--directory", str(short.root.parent)], ["final_observation", "episode 's' ended with 2 values", "6"]),
    }
    env = {"MINARI_DATASETS_PATH": str(datasets)}
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(cases, pool.map(lambda case: generate("export_minari", *case[0], env=env), cases.values()), strict=True))
    for case, result in results.items():
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, (case, result.stderr)
        assert len(lines) == 1 and "fix:" in lines[0], (case, result.stderr)
        for word in cases[case][1]:
            assert word in lines[0], (case, word, lines[0])
    assert len(load(datasets, "taken-v0")) == 1  # refused, not touched
    assert sorted(path.name for path in datasets.iterdir()) == ["taken-v0"]


def expert_move(mouse: tuple[int, int], cheese: tuple[int, int]) -> int:
    """Towards the cheese, rows first: up, down, left, right as the schema's labels."""
    if mouse[0] != cheese[0]:
        return 0 if cheese[0] < mouse[0] else 1
    return 2 if cheese[1] < mouse[1] else 3


def test_behaviour_cloning_example_learns_the_logged_policy(tmp_path: Path, datasets: Path) -> None:
    """README's training example, run on an export: its model imitates what was served, and the
    server's own check takes it as the policy's next version."""
    folder = policy_folder(tmp_path, "mouse_and_cheese")
    (folder / "models" / "1").mkdir(parents=True)
    shutil.copy2(EXAMPLES / "mouse_and_cheese" / "models" / "model.pt2", folder / "models" / "1" / "model.pt2")
    log = log_of(folder)
    rng = np.random.default_rng(0)
    for episode in range(60):
        mouse, cheese = (tuple(int(v) for v in rng.integers(0, 6, 2)) for _ in range(2))
        for t in range(12):
            move = expert_move(mouse, cheese)  # type: ignore[arg-type]
            log.step(f"ep{episode}", at(episode * 100 + t), mouse_row(mouse, cheese), [move])  # type: ignore[arg-type]
            mouse = (mouse[0] + (-1, 1, 0, 0)[move], mouse[1] + (0, 0, -1, 1)[move])
            done = mouse == cheese
            log.outcome(f"ep{episode}", at(episode * 100 + t + 0.5), 1.0 if done else -0.01, terminated=done, truncated=t == 11)
            if done:
                break
    log.write()
    export(datasets, "mouse/expert-v0", "--directory", str(folder))

    model_path = folder / "models" / "2" / "model.pt2"
    env = {"MINARI_DATASETS_PATH": str(datasets)}
    result = run([sys.executable, str(EXAMPLES / "behaviour_cloning.py"), "mouse/expert-v0", str(model_path)], cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert "trained on" in result.stdout

    dataset = load(datasets, "mouse/expert-v0")
    observations = np.concatenate([episode.observations[:-1] for episode in dataset.iterate_episodes()])
    actions = np.concatenate([episode.actions for episode in dataset.iterate_episodes()])
    logits = torch.export.load(model_path).module()(torch.as_tensor(observations))
    assert (logits.argmax(dim=1).numpy() == actions).mean() >= 0.95
    validated = generate("validate", str(folder))
    assert validated.returncode == 0, validated.stderr
    assert "would serve version 2" in validated.stdout
