"""Pieces (what one request adds to the log, made on the event loop in microseconds) and the
Arrow tables the writer's thread builds of many of them at once, in records.py's layout."""

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from policy_server.experience.records import OUTCOME_SCHEMA, has_fields, step_schema
from policy_server.schema import PolicySpec


class StepPiece(NamedTuple):
    """One request's decisions: its rows and what was answered, with each row's ids and step.
    A named tuple, made on the event loop for every logged request: a frozen dataclass took
    several times as long to build (a `object.__setattr__` per field), and it and its `__dict__`
    were two objects for the collector to scan while the piece waits for the flush. Tuples, not
    lists, inside: the collector stops tracking a tuple of strings or numbers the first time it
    sees one (a list, every collection rescans)."""

    episode_ids: tuple[str, ...]
    agent_ids: tuple[str, ...]
    steps: tuple[int, ...]
    time_us: int
    rows: np.ndarray  # [n, input width] float32
    actions: np.ndarray  # [n, values]: as answered
    head_probabilities: np.ndarray  # [n, heads], NaN where none
    head_log_probabilities: np.ndarray
    deterministic: bool


@dataclass(frozen=True)
class OutcomePiece:
    episode_id: str
    agent_id: str
    time_us: int
    version: str | None
    step: int | None
    reward: float
    terminated: bool
    truncated: bool
    final_observation: list[float] | None
    info: str | None


class StepTable:
    """Builds a policy version's steps table: the schema's named fields read back off the rows."""

    def __init__(self, spec: PolicySpec, process: str) -> None:
        self.schema = step_schema(spec)
        self.process = process
        self._fields = _field_columns(spec) if has_fields(spec) else None
        mask = spec.columns_of(spec.action_mask) if spec.action_mask else None
        self._mask = mask

    def __call__(self, pieces: Sequence[StepPiece]) -> pa.Table:
        # the pieces' fields as columns in one pass (a piece is a tuple): most pieces are one row
        episode_ids, agent_ids, steps, times_us, row_parts, action_parts, head_p_parts, head_logp_parts, deterministic_parts = zip(
            *pieces, strict=True
        )
        rows = np.concatenate(row_parts).astype(np.float32, copy=False)
        n = len(rows)
        head_p = np.concatenate(head_p_parts)
        head_logp = np.concatenate(head_logp_parts)
        actions = np.concatenate(action_parts).astype(np.float64, copy=False).reshape(n, -1)
        lengths = np.fromiter(map(len, row_parts), np.int64, len(pieces))
        times = np.repeat(np.array(times_us, dtype=np.int64), lengths)
        deterministic = np.repeat(np.array(deterministic_parts, dtype=np.bool_), lengths)
        columns = {
            "episode_id": pa.array(list(chain.from_iterable(episode_ids)), pa.string()),
            "agent_id": pa.array(list(chain.from_iterable(agent_ids)), pa.string()),
            "step": pa.array(np.fromiter(chain.from_iterable(steps), np.int64, n)),
            "time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "observation": _lists(rows),
            "actions": _lists(actions),
            "probability": _nullable(np.prod(head_p, axis=1)),
            "log_probability": _nullable(np.sum(head_logp, axis=1)),
            "head_probabilities": _lists(head_p),
            "head_log_probabilities": _lists(head_logp),
            "mask": pa.nulls(n, pa.list_(pa.bool_())) if self._mask is None else _lists(rows[:, self._mask] > 0.5),
            "deterministic": pa.array(deterministic),
            "process": pa.array(np.full(n, self.process, dtype=object), pa.string()),
        }
        if self._fields is not None:
            columns["fields"] = self._named(rows)
        return pa.table(columns, schema=self.schema)

    def _named(self, rows: np.ndarray) -> pa.StructArray:
        struct = self.schema.field("fields").type
        arrays = [_typed(rows[:, columns], kind, is_list) for columns, kind, is_list in self._fields or ()]
        return pa.StructArray.from_arrays(arrays, fields=list(struct))


def outcomes_table(pieces: Sequence[OutcomePiece]) -> pa.Table:
    return pa.Table.from_pylist([piece.__dict__ | {"time": piece.time_us} for piece in pieces], schema=_OUTCOME_INPUT).cast(OUTCOME_SCHEMA)


# from_pylist reads `time` as microseconds since the epoch; the cast makes it a UTC timestamp
_OUTCOME_INPUT = pa.schema([pa.field("time", pa.int64()) if f.name == "time" else f for f in OUTCOME_SCHEMA])


def _field_columns(spec: PolicySpec) -> list[tuple[slice, str, bool]]:
    columns = []
    start = 0
    for obs in spec.observations or ():
        width = obs.width or 0
        columns.append((slice(start, start + width), obs.kind, obs.is_list))
        start += width
    return columns


def _typed(values: np.ndarray, kind: str, is_list: bool) -> pa.Array:
    typed = values > 0.5 if kind == "bool" else values.astype(np.int64) if kind == "int" else values
    return _lists(typed) if is_list else pa.array(typed[:, 0])


def _lists(matrix: np.ndarray) -> pa.ListArray:
    """A [n, width] matrix as a list column (NaN floats as nulls)."""
    n, width = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, _nullable(matrix.reshape(-1)))


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, from_pandas=values.dtype.kind == "f")
