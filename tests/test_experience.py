"""Experience logging in one process: the episode book, the writer, and the routes through the app.

The real-process tests (SIGKILL, a full disk, a read-only one, backpressure, episodes played
over real uvicorn) are in test_experience_e2e.py.
"""

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AUTH, settings_for
from experience_support import every_file_reads, logging_policy, parquet_files, read_table
from fastapi.testclient import TestClient
from scipy.stats import norm

from policy_server.experience import writer
from policy_server.experience.episodes import AgentRef, EpisodeBook, EpisodeError
from policy_server.experience.writer import ExperienceWriter, Partition, finish_merges, merge_chunks
from policy_server.http.episodes import batch_agents
from policy_server.schema import Experience
from policy_server.server import build_app

MOUSE = {"mouse_row": 0, "mouse_col": 0, "mouse_row_distance": 3, "mouse_col_distance": 2, "cheese_row": 3, "cheese_col": 2}
MOUSE_ROW = [0.0, 0.0, 3.0, 2.0, 3.0, 2.0]
PENDULUM = {"cos_theta": 0.5, "sin_theta": -0.5, "theta_dot": 1.0}
MACHINES = {
    "queue_lengths": [1.0, 4.0],
    "job_size": 1.0,
    "urgency": 0.5,
    "energy_price": 0.2,
    "actionMask": [True, True, True, True, False],
}


@contextmanager
def app_of(folder: Path, **settings: Any) -> Iterator[TestClient]:
    """The app of `folder` with its lifespan: leaving it stops the server, the log written."""
    with TestClient(build_app(settings_for(folder, watch_every_s=None, **settings)), raise_server_exceptions=False) as client:
        yield client


# --- the episode book -------------------------------------------------------------------------


def test_the_book_counts_steps_per_agent_and_begins_again_after_an_end() -> None:
    book = EpisodeBook()
    a, b = AgentRef("e", "a"), AgentRef("e", "b")
    assert [book.step(a, "1"), book.step(a, "1"), book.step(b, "2")] == [0, 1, 0]
    assert book.outcome(a, ends=False).step == 1
    rewarded = book.outcome(b, ends=True)
    assert (rewarded.step, rewarded.version) == (0, "2")
    with pytest.raises(EpisodeError) as ended:
        book.outcome(b, ends=False)
    assert ended.value.status == 409 and "has ended" in str(ended.value)
    assert book.step(b, "2") == 0  # the same ids after the end: a new episode


def test_the_book_tells_an_unknown_episode_from_an_agent_without_an_action() -> None:
    book = EpisodeBook()
    book.step(AgentRef("e", "a"), "1")
    with pytest.raises(EpisodeError) as unknown:
        book.outcome(AgentRef("other"), ends=False)
    assert unknown.value.status == 404 and "unknown episode 'other'" in str(unknown.value)
    with pytest.raises(EpisodeError) as early:
        book.outcome(AgentRef("e", "b"), ends=False)
    assert early.value.status == 404 and "has no action yet" in str(early.value)


def test_the_book_forgets_the_agent_idle_longest_beyond_its_capacity() -> None:
    book = EpisodeBook(capacity=2)
    first, second, third = AgentRef("1"), AgentRef("2"), AgentRef("3")
    book.step(first, "1")
    book.step(second, "1")
    book.step(first, "1")  # first is the more recent now
    book.step(third, "1")
    assert len(book) == 2 and book.forgotten == 1
    book.outcome(first, ends=False)
    with pytest.raises(EpisodeError):
        book.outcome(second, ends=False)


def test_a_batch_names_each_observations_agent_or_none() -> None:
    named = [("e", "a"), (None, "b"), (None, None)]
    assert batch_agents(3, "q", named) == [AgentRef("e", "a"), AgentRef("q", "b"), AgentRef("q")]  # the query's episode by default
    assert batch_agents(3, None, named) == [AgentRef("e", "a"), None, None]  # an agent of no episode is not logged
    assert batch_agents(2, "q", None) == [AgentRef("q"), AgentRef("q")]  # one agent's consecutive steps
    assert batch_agents(2, None, [(None, "a"), (None, "b")]) is None
    assert batch_agents(2, None, None) is None


# --- the writer ------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", ["rotate_mb: 0.002", "rotate_minutes: 0.003"])
def test_segments_rotate_by_size_or_age_and_merge_into_whole_files(tmp_path: Path, rotation: str) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, f"{{dir: log, flush_seconds: 0.05, {rotation}}}")
    with app_of(folder) as client:
        for step in range(60):
            assert client.post(f"/predict?episode_id=e&seed={step}", json=MOUSE, headers=AUTH).status_code == 200
            if step % 10 == 9:
                time.sleep(0.25)  # flushes between: several chunks, older than 0.18 s, more than 2 KB together
    files = parquet_files(folder / "log")
    steps = [path for path in files if "steps" in path.parts]
    assert len(steps) > 1, "the steps rotate into several files"
    assert not [path for path in files if "-c0" in path.name], "every segment merged at the stop"
    assert every_file_reads(folder / "log") == 60
    assert [row["step"] for row in read_table(folder / "log", "steps")] == list(range(60))


def test_a_merge_cut_short_after_its_rename_is_finished_at_start(tmp_path: Path) -> None:
    part = tmp_path / "steps" / "policy=p" / "version=1" / "date=2026-01-01"
    part.mkdir(parents=True)
    for name in ("part-h-1-2-00001.parquet", "part-h-1-2-00001-c00000.parquet", "part-h-1-2-00002-c00000.parquet"):
        (part / name).write_bytes(b"x")
    finish_merges(tmp_path)
    assert sorted(path.name for path in part.iterdir()) == ["part-h-1-2-00001.parquet", "part-h-1-2-00002-c00000.parquet"]


def test_a_merge_streams_its_chunks_in_bounded_row_groups_and_keeps_every_row_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "_MERGED_ROW_GROUP", 20)
    chunks = []
    for index in range(10):  # 7 rows each: a row group closes once 20 are buffered
        chunks.append(tmp_path / f"part-h-1-2-00001-c{index:05d}.parquet")
        pq.write_table(pa.table({"step": pa.array(range(index * 7, index * 7 + 7), pa.int64())}), chunks[-1])
    merge_chunks(chunks, tmp_path / "part-h-1-2-00001.parquet")
    merged = pq.ParquetFile(tmp_path / "part-h-1-2-00001.parquet")
    assert [merged.metadata.row_group(i).num_rows for i in range(merged.num_row_groups)] == [21, 21, 21, 7]
    assert merged.read().column("step").to_pylist() == list(range(70))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["part-h-1-2-00001.parquet"], "the chunks removed, nothing hidden left"


def test_pieces_a_failed_write_kept_go_first_at_the_next_flush_before_those_that_came_after(tmp_path: Path) -> None:
    failures = iter([OSError(28, "No space left on device")])

    def table_of(pieces: Sequence[int]) -> pa.Table:  # fails once, as a full disk would
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return pa.table({"step": pa.array(pieces, pa.int64())})

    log = ExperienceWriter(Experience(tmp_path, flush_s=0.02), "p")
    partition = Partition(tmp_path / "steps", table_of)
    log.start()
    log.put(partition, 0, 1)
    log.put(partition, 1, 1)
    deadline = time.monotonic() + 10
    while log.state.error is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert log.state.error == "No space left on device" and log.refusal() is not None
    log.put(partition, 2, 1)  # came while the first two waited
    log.close()
    assert (log.state.pending_rows, log.state.written_rows, log.state.error) == (0, 3, None)
    (merged,) = parquet_files(tmp_path)
    assert pq.read_table(merged).column("step").to_pylist() == [0, 1, 2]


# --- the routes ------------------------------------------------------------------------------


def test_every_decision_route_logs_what_it_answered(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log}")
    with app_of(folder) as client:
        answers = [
            client.post("/predict?episode_id=solo&seed=1", json=MOUSE, headers=AUTH),
            client.post("/predict_deterministic?episode_id=solo", json=MOUSE, headers=AUTH),
            client.post("/predict_raw?episode_id=solo&agent_id=x", json={"obs": MOUSE_ROW}, headers=AUTH),
            client.post("/predict?episode_id=e%3A1&agent_id=a", json=MOUSE, headers=AUTH),  # quoted: FastAPI's own path
            client.post(
                "/predict_batch?episode_id=many&seed=2",
                json={"observations": [MOUSE | {"agent_id": "a"}, MOUSE | {"agent_id": "b"}]},
                headers=AUTH,
            ),
            client.post(
                "/predict_batch", json={"observations": [MOUSE | {"episode_id": "p"}, MOUSE, MOUSE | {"episode_id": "q"}]}, headers=AUTH
            ),
            client.post("/predict?agent_id=x", json=MOUSE, headers=AUTH),  # no episode: not logged
        ]
        assert [answer.status_code for answer in answers] == [200] * 7
        assert [answer.headers.get("X-Episode-Step") for answer in answers] == ["0", "1", "0", "0", None, None, None]
    steps = read_table(folder / "log", "steps")
    expected = [("solo", "", 0, False), ("solo", "", 1, True), ("solo", "x", 0, False), ("e:1", "a", 0, False)]
    expected += [("many", "a", 0, False), ("many", "b", 0, False), ("p", "", 0, False), ("q", "", 0, False)]
    assert [(s["episode_id"], s["agent_id"], s["step"], s["deterministic"]) for s in steps] == expected
    answered = [answers[0].json(), answers[1].json(), answers[2].json(), answers[3].json()]
    second_batch = answers[5].json()["results"]
    answered += answers[4].json()["results"] + [second_batch[0], second_batch[2]]  # the middle observation named no episode
    for step, answer in zip(steps, answered, strict=True):
        assert step["observation"] == MOUSE_ROW
        assert step["fields"] == {name: float(value) for name, value in MOUSE.items()}
        assert step["actions"] == answer["actions"]
        assert step["probability"] == pytest.approx(answer["probability"], rel=1e-12)
        assert step["log_probability"] == pytest.approx(math.log(answer["probability"]), rel=1e-12)
        assert (step["policy"], str(step["version"]), step["mask"]) == ("mouse_and_cheese", "1", None)


def test_outcomes_reward_the_last_action_and_end_the_episode(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log}")
    with app_of(folder) as client:
        client.post("/predict?episode_id=e", json=MOUSE, headers=AUTH)
        client.post("/predict?episode_id=e", json=MOUSE, headers=AUTH)
        first = client.post("/experience", json={"episode_id": "e", "reward": 0.5, "info": {"why": "closer"}}, headers=AUTH)
        last = client.post("/experience", json={"episode_id": "e", "reward": 1, "terminated": True, "observation": MOUSE}, headers=AUTH)
        after = client.post("/experience", json={"episode_id": "e", "reward": 1}, headers=AUTH)
        unknown = client.post("/policies/mouse_and_cheese/experience", json={"episode_id": "nope", "reward": 1}, headers=AUTH)
        bad_id = client.post("/experience", json={"episode_id": "a b", "reward": 1}, headers=AUTH)
        no_reward = client.post("/experience", json={"episode_id": "e"}, headers=AUTH)
        unauthorised = client.post("/experience", json={"episode_id": "e", "reward": 1})
    assert first.json() == {"episode_id": "e", "agent_id": "", "step": 1, "version": "1", "ended": False}
    assert first.headers["X-Policy-Name"] == "mouse_and_cheese"
    assert last.json()["ended"] is True
    assert after.status_code == 409 and "has ended" in after.json()["detail"]
    assert unknown.status_code == 404 and "unknown episode 'nope'" in unknown.json()["detail"]
    assert bad_id.status_code == 422 and bad_id.json()["detail"][0]["loc"] == ["body", "episode_id"]
    assert no_reward.status_code == 422 and no_reward.json()["detail"][0]["loc"] == ["body", "reward"]
    assert unauthorised.status_code == 401
    outcomes = read_table(folder / "log", "outcomes")
    assert [(o["step"], o["reward"], o["terminated"], o["info"]) for o in outcomes] == [
        (1, 0.5, False, '{"why":"closer"}'),
        (1, 1.0, True, None),
    ]
    assert outcomes[1]["final_observation"] == MOUSE_ROW


def test_collect_experience_serves_the_original_shape(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log}")
    with app_of(folder) as client:
        first = client.post("/collect_experience", json={"observation": MOUSE, "reward": 0}, headers=AUTH)
        second = client.post("/collect_experience", json={"observation": MOUSE, "reward": 0.25}, headers=AUTH)
        done = client.post("/collect_experience", json={"observation": MOUSE, "reward": 1, "done": True}, headers=AUTH)
        again = client.post("/collect_experience", json={"observation": MOUSE, "reward": 3}, headers=AUTH)
    assert [r.status_code for r in (first, second, done, again)] == [200] * 4
    assert set(first.json()) == {"actions", "probability", "done"}
    assert [r.headers.get("X-Episode-Step") for r in (first, second, done, again)] == ["0", "1", None, "0"]
    steps = read_table(folder / "log", "steps")
    assert [(s["episode_id"], s["step"]) for s in steps] == [("collect", 0), ("collect", 1), ("collect", 0)]
    outcomes = read_table(folder / "log", "outcomes")
    assert [(o["step"], o["reward"], o["terminated"]) for o in outcomes] == [(0, 0.25, False), (1, 1.0, True)]


def test_a_policy_without_logging_says_how_to_turn_it_on(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "null")
    with app_of(folder) as client:
        served = client.post("/predict?episode_id=e", json=MOUSE, headers=AUTH)
        refused = client.post("/experience", json={"episode_id": "e", "reward": 1}, headers=AUTH)
        info = client.get("/info", headers=AUTH).json()
        spec = client.get("/openapi.json").json()
    assert served.status_code == 200 and "X-Episode-Step" not in served.headers
    assert refused.status_code == 404 and "POLICY_SERVER_EXPERIENCE_DIR" in refused.json()["detail"]
    assert info["experience"] is None
    assert "/experience" not in spec["paths"] and "/predict" in spec["paths"]
    assert not (folder / "log").exists()


def test_the_environment_turns_logging_on_for_every_policy(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "null")
    with app_of(folder, experience_dir=tmp_path / "elsewhere") as client:
        client.post("/predict?episode_id=e", json=MOUSE, headers=AUTH)
        info = client.get("/info", headers=AUTH).json()
        metrics = client.get("/metrics").text
    assert info["experience"]["dir"] == str(tmp_path / "elsewhere")
    assert 'policy_server_experience_rows_pending{policy="mouse_and_cheese"}' in metrics
    assert [row["episode_id"] for row in read_table(tmp_path / "elsewhere", "steps")] == ["e"]


# --- log-probabilities against /distribution -------------------------------------------------


def _heads(client: TestClient, observation: dict[str, Any]) -> list[dict[str, Any]]:
    return client.post("/distribution", json=observation, headers=AUTH).json()["heads"]


def test_discrete_log_probabilities_equal_the_distribution_of_each_head(tmp_path: Path) -> None:
    folder = logging_policy("tuple_masking", tmp_path, "{dir: log}")
    with app_of(folder) as client:
        heads = _heads(client, MACHINES)
        for seed in range(20):
            assert client.post(f"/predict?episode_id=e{seed}&seed={seed}", json=MACHINES, headers=AUTH).status_code == 200
    steps = read_table(folder / "log", "steps")
    assert len(steps) == 20
    for step in steps:
        expected = [head["probabilities"][int(action)] for head, action in zip(heads, step["actions"], strict=True)]
        assert step["head_probabilities"] == pytest.approx(expected, rel=1e-12)
        assert step["head_log_probabilities"] == pytest.approx(np.log(expected).tolist(), rel=1e-12)
        assert step["log_probability"] == pytest.approx(sum(np.log(expected)), rel=1e-12)
        assert step["mask"] == MACHINES["actionMask"]
        assert step["fields"]["queue_lengths"] == [1.0, 4.0]
    assert {step["actions"][1] for step in steps} <= {0.0, 1.0, 2.0}
    assert all(step["actions"][1] != 2.0 or step["mask"][4] for step in steps)  # fast is masked: never chosen


def test_continuous_log_probabilities_are_the_density_of_the_action(tmp_path: Path) -> None:
    folder = logging_policy("pendulum", tmp_path, "{dir: log}")
    with app_of(folder) as client:
        (head,) = _heads(client, PENDULUM)
        mean, std = head["mean"][0], head["std"][0]
        for seed in range(30):
            client.post(f"/predict?episode_id=s{seed}&seed={seed}", json=PENDULUM, headers=AUTH)
        client.post("/predict_deterministic?episode_id=d", json=PENDULUM, headers=AUTH)
    steps = read_table(folder / "log", "steps")
    inside = [step for step in steps if not step["deterministic"] and -2.0 < step["actions"][0] < 2.0]  # not clipped
    assert len(inside) >= 10
    for step in inside:
        assert step["log_probability"] == pytest.approx(norm.logpdf(step["actions"][0], mean, std), rel=1e-9)
        assert step["probability"] is None and step["head_probabilities"] == [None]
    (deterministic,) = [step for step in steps if step["deterministic"]]
    assert deterministic["log_probability"] == pytest.approx(norm.logpdf(mean, mean, std), rel=1e-9)


def test_duckdb_reads_the_log_as_the_readme_shows(tmp_path: Path) -> None:
    folder = logging_policy("mouse_and_cheese", tmp_path, "{dir: log}")
    with app_of(folder) as client:
        for agent in ("a", "b", "a"):
            client.post(f"/predict?episode_id=e&agent_id={agent}", json=MOUSE, headers=AUTH)
        client.post("/experience", json={"episode_id": "e", "agent_id": "a", "reward": 2.0}, headers=AUTH)
    steps = f"{folder / 'log'}/steps/**/*.parquet"
    outcomes = f"{folder / 'log'}/outcomes/**/*.parquet"
    per_agent = duckdb.sql(
        f"SELECT agent_id, count(*) AS steps, max(fields.mouse_row_distance) AS far FROM read_parquet('{steps}', hive_partitioning = true) "
        "WHERE policy = 'mouse_and_cheese' GROUP BY agent_id ORDER BY agent_id"
    ).fetchall()
    assert per_agent == [("a", 2, 3.0), ("b", 1, 3.0)]
    assert duckdb.sql(f"SELECT sum(reward) FROM read_parquet('{outcomes}', hive_partitioning = true)").fetchall() == [(2.0,)]


def test_the_log_config_is_checked_at_start(tmp_path: Path) -> None:
    from policy_server.errors import ConfigError
    from policy_server.schema import load_spec

    folder = logging_policy("mouse_and_cheese", tmp_path, "{flush_seconds: 0}")
    with pytest.raises(ConfigError) as missing:
        load_spec(folder / "schema.yaml")
    assert "experience.dir: is missing" in str(missing.value)
    (folder / "schema.yaml").write_text((folder / "schema.yaml").read_text().replace("{flush_seconds: 0}", "{dir: log, flush_seconds: 0}"))
    with pytest.raises(ConfigError) as zero:
        load_spec(folder / "schema.yaml")
    assert "experience.flush_seconds: must be a positive number" in str(zero.value)
    (folder / "schema.yaml").write_text((folder / "schema.yaml").read_text().replace("flush_seconds: 0}", "rotate_mb: 8}"))
    assert load_spec(folder / "schema.yaml").experience == Experience((folder / "log").resolve(), rotate_mb=8.0)
