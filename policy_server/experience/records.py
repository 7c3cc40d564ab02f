"""What the experience log holds, and where: the Parquet layout is the contract between the
server that writes it and whoever reads it (export_minari, pandas, polars, DuckDB).

Two tables under the experience directory, Hive-partitioned (the partition values live in the
path only, not in the files):

    DIR/steps/policy=NAME/version=V/date=YYYY-MM-DD/*.parquet      one row per decision
    DIR/outcomes/policy=NAME/date=YYYY-MM-DD/*.parquet             one row per POST .../experience

Files whose names start with "." or "_" are being written: readers skip them (DuckDB, pyarrow
and pandas do by default). A step's `step` counts that agent's decisions in its episode from 0,
as the process that served it saw them; with several API processes the order of an episode is
(time, step). A reward belongs to the agent's latest step at or before the outcome's time; an
outcome with `terminated` or `truncated` ends the episode, and a later step of the same ids
starts a new one.
"""

import pyarrow as pa

from policy_server.experience.episodes import SINGLE_AGENT
from policy_server.schema import ObservationField, PolicySpec

__all__ = ["OUTCOMES", "OUTCOME_SCHEMA", "SINGLE_AGENT", "STEPS", "has_fields", "step_schema"]

STEPS = "steps"
OUTCOMES = "outcomes"

_TIME = pa.timestamp("us", tz="UTC")
_SCALARS = {"int": pa.int64(), "float": pa.float32(), "bool": pa.bool_()}

OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("agent_id", pa.string(), nullable=False),
        pa.field("time", _TIME, nullable=False),
        pa.field("version", pa.string()),  # of the step rewarded, when this process served it
        pa.field("step", pa.int64()),  # likewise
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("terminated", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("final_observation", pa.list_(pa.float32())),  # the row after the last action, if sent
        pa.field("info", pa.string()),  # the caller's JSON object, as sent
    ]
)


def step_schema(spec: PolicySpec) -> pa.Schema:
    """The steps table of a policy version: fixed columns, then `fields` (the observation's named
    values, typed as the schema types them) when the schema names observations of fixed widths."""
    columns = [
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("agent_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("time", _TIME, nullable=False),
        pa.field("observation", pa.list_(pa.float32()), nullable=False),  # the model's input row
        pa.field("actions", pa.list_(pa.float64()), nullable=False),  # as answered: one per discrete head, every value of a continuous one
        pa.field("probability", pa.float64()),  # joint, of the actions answered (continuous: null)
        pa.field("log_probability", pa.float64()),  # joint (continuous: the density's; null without a std)
        pa.field("head_probabilities", pa.list_(pa.float64())),  # per head (continuous heads: null)
        pa.field("head_log_probabilities", pa.list_(pa.float64())),  # per head
        pa.field("mask", pa.list_(pa.bool_())),  # the action mask's entries; null without a mask
        pa.field("deterministic", pa.bool_(), nullable=False),  # the most likely action, not a sample
        pa.field("process", pa.string(), nullable=False),  # host:pid of the API process that served it
    ]
    if has_fields(spec):
        columns.append(pa.field("fields", pa.struct([_field_type(obs) for obs in spec.observations]), nullable=False))
    return pa.schema(columns)


def has_fields(spec: PolicySpec) -> bool:
    """Whether each observation sits at a fixed place in the row (no list of varying length)."""
    return bool(spec.observations) and spec.input_size is not None


def _field_type(obs: ObservationField) -> pa.Field:
    scalar = _SCALARS[obs.kind]
    return pa.field(obs.name, pa.list_(scalar) if obs.is_list else scalar, nullable=False)
