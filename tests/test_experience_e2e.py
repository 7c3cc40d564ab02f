"""Experience logging with real processes: episodes played over real uvicorn and read back, a
SIGKILL, a full disk, a read-only one, and a log that cannot keep up.

The disk tests mount small tmpfs file systems (the suite runs as root, as CI does here).
"""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import minari
import numpy as np
import pytest
from conftest import AUTH
from experience_support import MouseGrid, every_file_reads, logging_policy, read_table, row_of
from servers import Server, free_port, generate, running_server, serve_command

MOUSE = {"mouse_row": 0, "mouse_col": 0, "mouse_row_distance": 3, "mouse_col_distance": 2, "cheese_row": 3, "cheese_col": 2}
BOUND_S = 30.0  # every wait below gives up after this


@contextmanager
def serving(folder: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Server, httpx.Client]]:
    port = free_port()
    with (
        running_server(serve_command(folder, port), port, cwd=folder, env=env) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=10.0) as client,
    ):
        yield server, client


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (unmounted after)."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def until(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {BOUND_S} s: {what}")


@dataclass
class Played:
    """What the server answered: per (episode, agent), the steps' observations and answers, the
    outcomes posted, and the final observation each episode ended on."""

    steps: dict[tuple[str, str], list[tuple[list[float], dict[str, Any]]]]
    outcomes: dict[tuple[str, str], list[tuple[float, bool, bool]]]
    finals: dict[tuple[str, str], list[float]]


def play(client: httpx.Client) -> Played:
    """Two episodes: one mouse alone (/predict), two mice in one episode (/predict_batch, each
    observation naming its agent)."""
    played = Played({}, {}, {})

    def outcome(episode: str, agent: str, world: MouseGrid, reward: float, terminated: bool, truncated: bool) -> None:
        body: dict[str, Any] = {"episode_id": episode, "reward": reward, "terminated": terminated, "truncated": truncated}
        if agent:
            body["agent_id"] = agent
        if terminated or truncated:
            body["observation"] = world.observation()
            played.finals[episode, agent] = row_of(world.observation())
        answer = client.post("/experience", json=body)
        assert answer.status_code == 200, answer.text
        played.outcomes.setdefault((episode, agent), []).append((reward, terminated, truncated))

    solo = MouseGrid((0, 0), (3, 2))
    for step in range(solo.limit):
        answer = client.post(f"/predict?episode_id=solo&seed={step}", json=solo.observation())
        assert answer.headers["X-Episode-Step"] == str(step)
        played.steps.setdefault(("solo", ""), []).append((row_of(solo.observation()), answer.json()))
        reward, terminated, truncated = solo.step(answer.json()["actions"][0])
        outcome("solo", "", solo, reward, terminated, truncated)
        if terminated or truncated:
            break

    mice = {"left": MouseGrid((5, 0), (2, 2)), "right": MouseGrid((0, 5), (2, 2))}
    for step in range(12):
        names = list(mice)
        body = {"observations": [mice[name].observation() | {"agent_id": name} for name in names]}
        answer = client.post(f"/predict_batch?episode_id=pair&seed={step}", json=body)
        assert answer.status_code == 200, answer.text
        for name, result in zip(names, answer.json()["results"], strict=True):
            played.steps.setdefault(("pair", name), []).append((row_of(mice[name].observation()), result))
            reward, terminated, truncated = mice[name].step(result["actions"][0])
            outcome("pair", name, mice[name], reward, terminated, truncated)
            if terminated or truncated:
                del mice[name]
        if not mice:
            break
    return played


def test_episodes_played_over_http_are_logged_step_by_step_and_exported_to_minari(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log}")
    with serving(folder) as (server, client):
        played = play(client)
    assert "Application shutdown complete" in server.log  # SIGTERM: a graceful stop
    steps, outcomes = read_table(folder / "log", "steps"), read_table(folder / "log", "outcomes")
    assert (
        {(row["episode_id"], row["agent_id"]) for row in steps} == set(played.steps) == {("solo", ""), ("pair", "left"), ("pair", "right")}
    )
    for (episode, agent), answered in played.steps.items():
        logged = [row for row in steps if (row["episode_id"], row["agent_id"]) == (episode, agent)]
        assert [row["step"] for row in logged] == list(range(len(answered)))
        for row, (observation, answer) in zip(logged, answered, strict=True):
            assert row["observation"] == observation
            assert row["actions"] == answer["actions"]
            assert row["probability"] == pytest.approx(answer["probability"], rel=1e-12)
        posted = [(o["reward"], o["terminated"], o["truncated"]) for o in outcomes if (o["episode_id"], o["agent_id"]) == (episode, agent)]
        assert posted == played.outcomes[episode, agent]
        assert [o["step"] for o in outcomes if (o["episode_id"], o["agent_id"]) == (episode, agent)] == list(range(len(answered)))

    datasets = tmp_path / "datasets"
    exported = generate("export_minari", "mouse/played-v0", "--directory", str(folder), env={"MINARI_DATASETS_PATH": str(datasets)})
    assert exported.returncode == 0, exported.stderr
    os.environ["MINARI_DATASETS_PATH"] = str(datasets)
    try:
        dataset = minari.load_dataset("mouse/played-v0")
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    metadata = list(dataset.storage.get_episode_metadata(range(dataset.total_episodes)))
    assert sorted((m["episode_id"], m["agent_id"]) for m in metadata) == sorted(played.steps)
    for meta, episode in zip(metadata, dataset.iterate_episodes(), strict=True):
        key = (meta["episode_id"], meta["agent_id"])
        answered, ends = played.steps[key], played.outcomes[key]
        expected_rows = [observation for observation, _ in answered] + [played.finals[key]]
        np.testing.assert_array_equal(episode.observations, np.array(expected_rows, dtype=np.float32))
        assert episode.actions.tolist() == [answer["actions"][0] for _, answer in answered]
        assert episode.rewards.tolist() == [reward for reward, _, _ in ends]
        assert episode.terminations.tolist() == [terminated for _, terminated, _ in ends]
        assert episode.truncations.tolist() == [truncated for _, _, truncated in ends]
        np.testing.assert_allclose(episode.infos["probability"][:-1], [answer["probability"] for _, answer in answered], rtol=1e-12)


def test_sigkill_loses_at_most_the_flush_interval_and_leaves_every_file_whole(tmp_path: Path) -> None:
    flush_s = 0.25
    folder = logging_policy("mouse_and_cheese", tmp_path, f"{{dir: log, flush_seconds: {flush_s}}}")
    answered: list[tuple[int, float]] = []  # step, when its answer came
    with serving(folder) as (server, client):
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            answer = client.post("/predict?episode_id=crash", json=MOUSE)
            assert answer.status_code == 200
            answered.append((int(answer.headers["X-Episode-Step"]), time.monotonic()))
        server.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        server.process.wait(BOUND_S)
    assert server.process.returncode == -signal.SIGKILL
    assert every_file_reads(folder / "log") > 0  # each file reads whole: none cut short by the kill
    on_disk = {row["step"] for row in read_table(folder / "log", "steps")}
    assert on_disk <= {step for step, _ in answered}
    due = {step for step, at in answered if at < killed - (flush_s + 1.0)}  # a flush interval, and a second for a busy machine
    assert len(due) > 100 and due <= on_disk, f"{len(due - on_disk)} of {len(due)} steps answered before the last interval are missing"
    with serving(folder) as (_, client):  # the next start serves on, beside what the killed one left
        assert client.post("/predict?episode_id=after", json=MOUSE).status_code == 200
    episodes = {row["episode_id"] for row in read_table(folder / "log", "steps")}
    assert episodes == {"crash", "after"}


def _post_until(client: httpx.Client, status: int, episode: str, limit: int = 5_000) -> tuple[httpx.Response, int]:
    """Predict for `episode` until an answer has `status`; that answer, and how many 200s came before."""
    for accepted in range(limit):
        answer = client.post(f"/predict?episode_id={episode}", json=MOUSE)
        if answer.status_code == status:
            return answer, accepted
        assert answer.status_code == 200, answer.text
    raise AssertionError(f"no {status} in {limit} requests")


def _experience_info(client: httpx.Client) -> dict[str, Any]:
    return client.get("/info").json()["experience"]


def test_a_full_disk_refuses_episodes_serves_the_rest_and_loses_nothing_accepted(tmp_path: Path) -> None:
    disk = tmpfs(tmp_path / "disk", "1m")
    with disk as mount:
        filler = mount / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1k", "count=1000"], check=False, capture_output=True)
        folder = logging_policy("mouse_and_cheese", tmp_path, f"{{dir: {mount / 'log'}, flush_seconds: 0.1}}")
        with serving(folder) as (_, client):
            refused, accepted = _post_until(client, 503, "full")
            assert "No space left on device" in refused.json()["detail"] and refused.headers["Retry-After"] == "1"
            assert client.post("/predict", json=MOUSE).status_code == 200  # no episode: served as before
            assert _experience_info(client)["state"] == "failing"
            assert 'policy_server_experience_failing{policy="mouse_and_cheese"} 1.0' in client.get("/metrics").text
            filler.unlink()  # room again: the rows kept in memory go to disk, episodes are taken again
            until(lambda: client.post("/predict?episode_id=full", json=MOUSE).status_code == 200, "an episode taken again")
            accepted += 1
            until(lambda: _experience_info(client)["state"] == "ok", "the log ok again")
        assert len(read_table(mount / "log", "steps")) == accepted


def test_a_read_only_directory_refuses_episodes_until_it_is_writable_again(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "16m") as mount:
        folder = logging_policy("mouse_and_cheese", tmp_path, f"{{dir: {mount}, flush_seconds: 0.1}}")
        with serving(folder) as (_, client):
            for _ in range(5):
                assert client.post("/predict?episode_id=ro", json=MOUSE).status_code == 200
            until(lambda: _experience_info(client)["written_rows"] == 5, "the first steps written")
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
            refused, accepted = _post_until(client, 503, "ro")
            assert "Read-only file system" in refused.json()["detail"]
            assert client.post("/predict_batch", json={"observations": [MOUSE]}).status_code == 200
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
            until(lambda: client.post("/predict?episode_id=ro", json=MOUSE).status_code == 200, "an episode taken again")
            accepted += 6
        assert len(read_table(mount, "steps")) == accepted


def test_a_log_behind_refuses_episodes_with_retry_after_and_keeps_its_bound(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log, flush_seconds: 60, max_pending_rows: 25}")
    with serving(folder) as (server, client):
        refused, accepted = _post_until(client, 503, "slow", limit=100)
        assert accepted == 25
        assert "is behind: 25 rows wait for the disk" in refused.json()["detail"] and refused.headers["Retry-After"] == "60"
        assert client.post("/predict", json=MOUSE).status_code == 200
        info = _experience_info(client)
        assert (info["state"], info["pending_rows"], info["refused_requests"]) == ("behind", 25, 1)
        os.kill(server.process.pid, signal.SIGTERM)  # a graceful stop writes what was accepted
        server.process.wait(BOUND_S)
    assert len(read_table(folder / "log", "steps")) == 25


def test_with_several_workers_an_outcome_finds_its_episode_whichever_worker_gets_it(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log, flush_seconds: 0.2}")
    port = free_port()
    command = [*serve_command(folder, port), "--workers", "2"]
    fresh = {**AUTH, "Connection": "close"}  # a new connection each: the workers take turns accepting them
    with running_server(command, port, cwd=folder) as server:
        for episode in range(40):
            step = httpx.post(f"{server.url}/predict?episode_id=w{episode}", json=MOUSE, headers=fresh)
            assert step.status_code == 200
            reward = {"episode_id": f"w{episode}", "reward": 1.0, "terminated": True}
            assert httpx.post(f"{server.url}/experience", json=reward, headers=fresh).status_code == 200, "found, whichever worker"
            again = httpx.post(f"{server.url}/experience", json=reward, headers=fresh)
            assert again.status_code == 409, "ended, whichever worker ended it"
        unknown = httpx.post(f"{server.url}/experience", json={"episode_id": "never", "reward": 1.0}, headers=fresh)
        assert unknown.status_code == 404
    steps, outcomes = read_table(folder / "log", "steps"), read_table(folder / "log", "outcomes")
    assert len(steps) == len(outcomes) == 40
    assert len({row["process"] for row in steps}) == 2, "both workers served steps"
    assert any(row["step"] is None for row in outcomes), "some outcomes reached the worker that did not serve the step"
