"""The experience log of one policy → a Minari dataset (`python generate.py export_minari`).

Per episode (join.py): observations, T+1 rows (the steps' rows, then the ending outcome's
`final_observation`, else the last row again); actions, rewards, terminations and truncations, T
each; infos `probability`, `log_probability`, `version` and `deterministic`, T+1 each as Minari's
arrow format stores them: entry t describes actions[t], and the last one, of the final
observation, which nothing decided, is NaN, NaN, "" and false. Each episode's metadata names its
`episode_id`, `agent_id` and `start` (its first step's time), to find it in the Parquet log.

An episode still running (no outcome ended it) is left out, or with `include_unfinished` cut
before its last step, which becomes its final observation: that step's action has no known
outcome. The dataset is written with Minari's public API in its "arrow" format (pyarrow, which
the log needs anyway; "hdf5" would need h5py), and never over an existing one.
"""

import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import gymnasium as gym
import minari
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from minari.data_collector.episode_buffer import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.dataset.minari_storage import MinariStorage
from minari.storage import get_dataset_path

from policy_server.errors import ConfigError, first_line
from policy_server.experience.join import Episode, Outcome, join
from policy_server.experience.records import OUTCOME_SCHEMA, OUTCOMES, STEPS, step_schema
from policy_server.loading import ModelVersion, load_version
from policy_server.repository import PolicySource, Snapshot
from policy_server.schema import DiscreteHead, Head, PolicySpec

EXPERIENCE_DIR_VARIABLE = "POLICY_SERVER_EXPERIENCE_DIR"
COMMAND = "export_minari"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STEP_COLUMNS = ("episode_id", "agent_id", "step", "time", "observation", "actions", "probability", "log_probability", "deterministic")
_OUTCOME_COLUMNS = ("episode_id", "agent_id", "time", "reward", "terminated", "truncated", "final_observation")
_SORT_OUTCOMES = [("episode_id", "ascending"), ("agent_id", "ascending"), ("time", "ascending")]
_SORT_STEPS = [*_SORT_OUTCOMES, ("step", "ascending")]


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the command's options, parsed."""

    dataset_id: str
    policy: str | None = None
    version: str | None = None  # episodes whose first step this version decided
    since: datetime | None = None  # episodes whose first step is in [since, until)
    until: datetime | None = None
    include_unfinished: bool = False


@dataclass(frozen=True)
class Summary:
    """What an export wrote and what it left out."""

    dataset_id: str
    dataset_path: Path
    policy: str
    log_dir: Path
    episodes: int
    steps: int
    include_unfinished: bool
    unfinished_skipped: int
    unfinished_included: int
    unmatched_outcomes: int
    repeated_final_observations: int

    def lines(self) -> list[str]:
        if self.include_unfinished:
            unfinished = (
                f"unfinished episodes (no outcome ended them): {self.unfinished_included} included, truncated before their last step;"
                f" {self.unfinished_skipped} of a single step skipped"
            )
        else:
            hint = " (--include_unfinished adds them, truncated before their last step)" if self.unfinished_skipped else ""
            unfinished = f"unfinished episodes (no outcome ended them) skipped: {self.unfinished_skipped}{hint}"
        return [
            f"exported policy {self.policy}'s experience log ({self.log_dir}) to Minari dataset {self.dataset_id} at {self.dataset_path}",
            f"episodes: {self.episodes}, steps: {self.steps}",
            unfinished,
            f"outcomes matching no step, ignored: {self.unmatched_outcomes}",
            f"episodes whose end sent no final observation (their last observation repeated): {self.repeated_final_observations}",
        ]


@dataclass(frozen=True)
class _Cut:
    """An episode as it goes to Minari: its decisions, and where its final observation comes from
    (the observation of step `final_step`, or the values the end sent)."""

    episode: Episode
    decisions: list[int]
    rewards: list[float]
    terminated: bool
    truncated: bool
    final_step: int | None
    final_observation: Sequence[float] | None


@dataclass(frozen=True)
class _Log:
    """A policy's log as read: steps sorted by (episode_id, agent_id, time, step), their times
    in µs, and the join of steps and outcomes."""

    steps: pa.Table
    times: np.ndarray
    versions: list[str]
    episodes: list[Episode]
    unmatched_times: list[int]


def export_minari(snapshot: Snapshot, request: ExportRequest, environ: Mapping[str, str]) -> Summary:
    """Read the log of the chosen policy, cut it into episodes and write them as a Minari dataset."""
    target = _free_dataset_path(request.dataset_id)
    source, log_dir = choose_policy(snapshot, request.policy, environ)
    assert source.spec is not None
    log = _read_log(source.spec, log_dir)
    chosen = [episode for episode in log.episodes if _wanted(episode, log, request)]
    ended = [episode for episode in chosen if episode.end is not None]
    running = [episode for episode in chosen if episode.end is None]
    cuts = [_cut(episode) for episode in ended]
    if request.include_unfinished:
        cuts += [_cut_unfinished(episode) for episode in running if len(episode.steps) > 1]
    if not cuts:
        raise ConfigError(
            log_dir,
            COMMAND,
            f"no episode to export: {len(chosen)} of the log's {len(log.episodes)} episodes match, {len(ended)} of them ended",
            "widen --version/--since/--until, or add --include_unfinished",
        )
    cuts.sort(key=lambda cut: (int(log.times[cut.episode.steps[0]]), cut.episode.key))
    actions = _Actions(_heads(source, request.version))
    buffers = _buffers(cuts, log, actions)
    observations = observation_space(source.spec, np.vstack([buffer.observations for buffer in buffers]))
    metadata = [_episode_metadata(cut, log) for cut in cuts]
    _write(target, request.dataset_id, buffers, metadata, (observations, actions.space), source.spec, log_dir)
    return Summary(
        dataset_id=request.dataset_id,
        dataset_path=target,
        policy=source.name,
        log_dir=log_dir,
        episodes=len(cuts),
        steps=sum(len(cut.decisions) for cut in cuts),
        include_unfinished=request.include_unfinished,
        unfinished_skipped=len(running) - (len(cuts) - len(ended)),
        unfinished_included=len(cuts) - len(ended),
        unmatched_outcomes=sum(1 for time in log.unmatched_times if _in_window(time, request)),
        repeated_final_observations=sum(1 for cut in cuts if cut.episode.end is not None and cut.final_step is not None),
    )


def parse_time(value: object, option: str) -> datetime:
    """An ISO 8601 time; without a timezone, UTC."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(
            COMMAND, option, f"{value!r} is not an ISO 8601 time", "write e.g. 2025-06-30 or 2025-06-30T14:00:00+02:00"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def choose_policy(snapshot: Snapshot, name: str | None, environ: Mapping[str, str]) -> tuple[PolicySource, Path]:
    """The policy to export and its log's directory: the one named, else the only one that logs."""
    logging = {policy: directory for policy, source in snapshot.policies.items() if (directory := log_dir_of(source, environ)) is not None}
    if name is None:
        if len(logging) != 1:
            problem = "no policy there logs experience" if not logging else f"several policies log experience: {', '.join(sorted(logging))}"
            fix = (
                "choose one with --policy NAME"
                if logging
                else f"add 'experience: {{dir: experience}}' to its schema.yaml, or set {EXPERIENCE_DIR_VARIABLE}"
            )
            raise ConfigError(snapshot.root, COMMAND, problem, fix)
        name = next(iter(logging))
    source = snapshot.policies.get(name)
    if source is None:
        raise ConfigError(snapshot.root, "--policy", f"no policy named {name!r}", f"choose one of: {', '.join(sorted(snapshot.policies))}")
    if source.spec is None:
        assert source.error is not None
        raise source.error
    if name not in logging:
        raise ConfigError(
            source.spec.path,
            "experience",
            f"policy {name} does not log experience",
            f"add 'experience: {{dir: experience}}', or set {EXPERIENCE_DIR_VARIABLE}",
        )
    return source, logging[name]


def log_dir_of(source: PolicySource, environ: Mapping[str, str]) -> Path | None:
    """Where the policy's experience is logged: POLICY_SERVER_EXPERIENCE_DIR for every policy,
    else its schema's `experience.dir`; None if it is not logged (or its schema cannot be read)."""
    if source.spec is None:
        return None
    override = environ.get(EXPERIENCE_DIR_VARIABLE)
    if override:
        return Path(override).resolve()
    return source.spec.experience.dir if source.spec.experience is not None else None


# --- reading the log ----------------------------------------------------------------------------


def _read_log(spec: PolicySpec, log_dir: Path) -> _Log:
    steps_dir = log_dir / STEPS / f"policy={spec.name}"
    step_fields = step_schema(spec)
    steps = _read_table(steps_dir, [step_fields.field(name) for name in _STEP_COLUMNS], ("version", "date"))
    if steps.num_rows == 0:
        raise ConfigError(
            steps_dir,
            COMMAND,
            f"no steps of policy {spec.name} logged there",
            f"name an episode in the prediction requests (?episode_id=...), or point --directory or {EXPERIENCE_DIR_VARIABLE} at the log",
        )
    steps = steps.sort_by(_SORT_STEPS)
    outcomes = _read_table(log_dir / OUTCOMES / f"policy={spec.name}", [OUTCOME_SCHEMA.field(name) for name in _OUTCOME_COLUMNS], ("date",))
    outcomes = outcomes.sort_by(_SORT_OUTCOMES)
    times = steps["time"].cast(pa.int64()).to_numpy()
    joined = join(_keys(steps), times, list(zip(_keys(outcomes), _outcomes(outcomes), strict=True)))
    return _Log(steps, times, steps["version"].to_pylist(), joined.episodes, [outcome.time for _, outcome in joined.unmatched])


def _read_table(folder: Path, fields: list[pa.Field], partitions: tuple[str, ...]) -> pa.Table:
    """The Parquet files under `folder` (Hive partitions `partitions`, read as strings); files whose
    names start with "." or "_" are still being written and skipped. No folder: no rows."""
    partition_schema = pa.schema([pa.field(name, pa.string()) for name in partitions])
    schema = pa.schema([*fields, *partition_schema])
    if not folder.is_dir():
        return schema.empty_table()
    try:
        dataset = ds.dataset(folder, schema=schema, format="parquet", partitioning=ds.partitioning(partition_schema, flavor="hive"))
        return dataset.to_table()
    except (pa.ArrowException, OSError) as error:
        raise ConfigError(folder, "parquet", f"cannot be read ({first_line(error)})", "move the unreadable file out of the log") from None


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["episode_id"].to_pylist(), table["agent_id"].to_pylist(), strict=True))


def _outcomes(table: pa.Table) -> list[Outcome]:
    columns = [table[name].to_pylist() for name in ("reward", "terminated", "truncated", "final_observation")]
    times = table["time"].cast(pa.int64()).to_pylist()
    return [Outcome(time, *values) for time, *values in zip(times, *columns, strict=True)]


def _wanted(episode: Episode, log: _Log, request: ExportRequest) -> bool:
    first = episode.steps[0]
    return (request.version is None or log.versions[first] == request.version) and _in_window(int(log.times[first]), request)


def _in_window(time_us: int, request: ExportRequest) -> bool:
    return (request.since is None or time_us >= _microseconds(request.since)) and (
        request.until is None or time_us < _microseconds(request.until)
    )


def _microseconds(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


# --- spaces -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Actions:
    """The policy's heads: the action space, and the logged actions (float64, one column per
    discrete head or continuous value) as that space stores them."""

    heads: tuple[Head, ...]

    @property
    def discrete(self) -> bool:
        return all(isinstance(head, DiscreteHead) for head in self.heads)

    @property
    def width(self) -> int:
        return sum(1 if isinstance(head, DiscreteHead) else head.size for head in self.heads)

    @property
    def space(self) -> gym.Space:
        if self.discrete:
            sizes = [head.n for head in self.heads if isinstance(head, DiscreteHead)]
            return gym.spaces.Discrete(sizes[0]) if len(sizes) == 1 else gym.spaces.MultiDiscrete(sizes)
        lows, highs = zip(*(_head_bounds(head) for head in self.heads), strict=True)
        return gym.spaces.Box(np.concatenate(lows), np.concatenate(highs), dtype=np.float32)

    def convert(self, actions: np.ndarray) -> np.ndarray:
        if actions.shape[1] != self.width:
            raise ConfigError(
                COMMAND,
                "actions",
                f"the log's actions have {actions.shape[1]} values, the policy's heads {self.width}",
                "export the versions whose heads are the schema's (--version)",
            )
        if not self.discrete:
            return actions.astype(np.float32)
        as_ints = actions.astype(np.int64)
        return as_ints[:, 0] if len(self.heads) == 1 else as_ints


def _head_bounds(head: Head) -> tuple[np.ndarray, np.ndarray]:
    assert not isinstance(head, DiscreteHead)
    low = np.full(head.size, -np.inf) if head.low is None else np.asarray(head.low)
    high = np.full(head.size, np.inf) if head.high is None else np.asarray(head.high)
    return low.astype(np.float32), high.astype(np.float32)


def _heads(source: PolicySource, version: str | None) -> tuple[Head, ...]:
    """The schema's `actions`; without them, the heads read from the model (of `version`, else
    of the version served), as the server reads them: the log alone cannot tell how many
    choices a discrete head has."""
    assert source.spec is not None
    if source.spec.actions is not None:
        return source.spec.actions
    chosen = source.version(version) if version is not None else source.wanted
    if chosen is None or chosen.model_file is None:
        raise ConfigError(
            source.spec.path,
            "actions",
            "is not declared, and no model file of the version is there to read the heads from",
            "declare the heads under actions (e.g. '- {name: move, n: 4}')",
        )
    return load_version(ModelVersion(source.folder, source.spec, chosen.model_file, chosen.label)).heads


def observation_space(spec: PolicySpec, observations: np.ndarray) -> gym.spaces.Box:
    """A float32 Box of the rows' width. A column's bounds are its field's (`minimum`/`maximum`,
    booleans 0 and 1) when the schema's fields have fixed widths adding up to the rows', and no
    row lies outside them (rows sent to /predict_raw are not checked); else unbounded."""
    width = observations.shape[1]
    low, high = np.full(width, -np.inf, dtype=np.float32), np.full(width, np.inf, dtype=np.float32)
    if spec.observations is not None and spec.input_size == width:
        column = 0
        for obs in spec.observations:
            assert obs.width is not None
            bounds = (0.0, 1.0) if obs.kind == "bool" else (obs.minimum, obs.maximum)
            low[column : column + obs.width] = -np.inf if bounds[0] is None else bounds[0]
            high[column : column + obs.width] = np.inf if bounds[1] is None else bounds[1]
            column += obs.width
        low[observations.min(axis=0) < low] = -np.inf
        high[observations.max(axis=0) > high] = np.inf
    return gym.spaces.Box(low, high, dtype=np.float32)


# --- episodes → Minari buffers ------------------------------------------------------------------


def _cut(episode: Episode) -> _Cut:
    """An ended episode, whole: its final observation the end's, else its last one again."""
    assert episode.end is not None
    final = episode.end.final_observation
    return _Cut(
        episode, episode.steps, episode.rewards, episode.end.terminated, episode.end.truncated, None if final else episode.steps[-1], final
    )


def _cut_unfinished(episode: Episode) -> _Cut:
    """A running episode, truncated before its last step, whose observation ends it."""
    return _Cut(episode, episode.steps[:-1], episode.rewards[:-1], False, True, episode.steps[-1], None)


def _buffers(cuts: list[_Cut], log: _Log, heads: _Actions) -> list[EpisodeBuffer]:
    observation_rows = np.array(
        [row for cut in cuts for row in [*cut.decisions, *([cut.final_step] if cut.final_step is not None else [])]]
    )
    observations = _matrix(log.steps["observation"], observation_rows, "observation")
    decision_rows = np.array([row for cut in cuts for row in cut.decisions])
    actions = heads.convert(_matrix(log.steps["actions"], decision_rows, "actions"))
    probabilities = _floats(log.steps["probability"], decision_rows)
    log_probabilities = _floats(log.steps["log_probability"], decision_rows)
    deterministic = log.steps["deterministic"].take(decision_rows).to_pylist()
    buffers = []
    seen_observations = seen_decisions = 0
    for index, cut in enumerate(cuts):
        steps = len(cut.decisions)
        taken = steps + (cut.final_step is not None)
        rows = observations[seen_observations : seen_observations + taken]
        if cut.final_observation:
            rows = np.vstack([rows, _final_row(cut, rows.shape[1])])
        window = slice(seen_decisions, seen_decisions + steps)
        buffers.append(
            EpisodeBuffer(
                id=index,
                observations=rows,
                actions=actions[window],
                rewards=cut.rewards,
                terminations=[False] * (steps - 1) + [cut.terminated],
                truncations=[False] * (steps - 1) + [cut.truncated],
                infos={
                    "probability": [*probabilities[window].tolist(), float("nan")],
                    "log_probability": [*log_probabilities[window].tolist(), float("nan")],
                    "version": [*(log.versions[row] for row in cut.decisions), ""],
                    "deterministic": [*deterministic[window], False],
                },
            )
        )
        seen_observations += taken
        seen_decisions += steps
    return buffers


def _matrix(column: pa.ChunkedArray, rows: np.ndarray, name: str) -> np.ndarray:
    """The list column's `rows` as a matrix, one row each; they must be of one width."""
    taken = column.take(rows).combine_chunks()
    widths = pc.list_value_length(taken).to_numpy()
    if widths.min() != widths.max():
        raise ConfigError(
            COMMAND,
            name,
            f"the episodes exported have {name} rows of widths {widths.min()} to {widths.max()}, and a Minari space has one",
            "export one version at a time (--version), or episodes of one schema (--since/--until)",
        )
    return taken.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), int(widths[0]))


def _floats(column: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """A nullable float column's `rows`, null as NaN (a continuous action has no probability)."""
    return pc.fill_null(column.take(rows), float("nan")).to_numpy()


def _final_row(cut: _Cut, width: int) -> np.ndarray:
    assert cut.final_observation is not None
    row = np.asarray(cut.final_observation, dtype=np.float32)
    if row.shape != (width,):
        episode_id, agent_id = cut.episode.key
        raise ConfigError(
            COMMAND,
            "final_observation",
            f"episode {episode_id!r}{f' agent {agent_id!r}' if agent_id else ''} ended with {row.size} values, its observations have {width}",
            "send the row the policy would be given next, or none",
        )
    return row


def _episode_metadata(cut: _Cut, log: _Log) -> dict[str, str]:
    start = _EPOCH + timedelta(microseconds=int(log.times[cut.episode.steps[0]]))
    return {"episode_id": cut.episode.key[0], "agent_id": cut.episode.key[1], "start": start.isoformat()}


# --- writing ------------------------------------------------------------------------------------


def _free_dataset_path(dataset_id: str) -> Path:
    """Where Minari keeps the dataset (MINARI_DATASETS_PATH, else ~/.minari/datasets); refused if taken."""
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise ConfigError(
            COMMAND, "DATASET_ID", f"{dataset_id!r} is not a Minari dataset id", "write (namespace/)name-vN, e.g. mouse/served-v0"
        ) from None
    path = Path(get_dataset_path(dataset_id))
    if path.exists():
        raise ConfigError(
            path,
            "DATASET_ID",
            f"a Minari dataset {dataset_id} exists already",
            f"choose another id (raise its -vN), or delete it: minari delete {dataset_id}",
        )
    return path


def _write(
    target: Path,
    dataset_id: str,
    buffers: list[EpisodeBuffer],
    metadata: list[dict[str, str]],
    spaces: tuple[gym.Space, gym.Space],
    spec: PolicySpec,
    log_dir: Path,
) -> None:
    """create_dataset_from_buffers, without the environment a served policy's log has none of,
    then each episode's metadata; a dataset half written is removed.

    Minari 0.5.4's arrow storage measures the whole dataset (a walk of all its files) after every
    episode it writes, which makes writing N episodes O(N²) (bench/RESULTS.md, "Export to
    Minari"). The walk only sets `dataset_size`, so it is skipped while the episodes are written
    and made once, when their metadata is written (update_episode_metadata ends with it)."""
    try:
        with warnings.catch_warnings(), mock.patch.object(MinariStorage, "get_size", return_value=0.0):
            # Minari warns of every field left unset (author, email, code link, environments): none applies here.
            warnings.simplefilter("ignore", UserWarning)
            dataset = minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                env=None,
                observation_space=spaces[0],
                action_space=spaces[1],
                algorithm_name=f"policy-server: {spec.name}",
                description=f"The decisions policy {spec.name} served, exported from its experience log {log_dir}.",
                data_format="arrow",
            )
        dataset.storage.update_episode_metadata(metadata, range(len(metadata)))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
