"""The request and response models built from a `PolicySpec`, and observations → float32 rows.

Split from schema.py because it is the other half of the contract: schema.py reads the file,
this module turns the result into the pydantic models FastAPI validates and documents with, and
into the one vector op per request that makes rows.
"""

import math
import operator
from collections.abc import Callable, Sequence
from itertools import accumulate, chain, pairwise
from typing import Annotated, Any, NotRequired

import numpy as np
import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, GetJsonSchemaHandler, StringConstraints, create_model
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from typing_extensions import TypedDict

from policy_server.errors import InputError
from policy_server.experience.episodes import ID_PATTERN, ID_RULE
from policy_server.schema import DiscreteHead, ObservationField, PolicySpec

_PYTHON_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool}
# The range of a value, in the spec and in the row encoder: a float within float32's (beyond, it
# would reach the model as infinity); an int within ±(2**53 - 1), the integers a double holds
# exactly (RFC 8259's interoperable range). Past it, readers disagree: orjson reads an integer
# beyond 64 bits as a float, JSON Schema validators often compare as doubles; within it, all agree.
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT_LIMIT = 2**53 - 1

# An observation is a TypedDict: validated into a plain dict in schema order, it costs a third of
# a model instance (1,024 observations: ~1.1 ms instead of ~2.6 ms), and its keys are the schema's
# names, any string (a field called "model_config" or "max-speed" works too). Extra keys are
# dropped: the original's clients send every observation they have.
# Strict: a value is taken only in the JSON type the spec gives it (a float field takes JSON
# numbers, not true or "3"; a bool field only true and false), on the fast path and on the slow path.
_OBSERVATION_CONFIG = ConfigDict(allow_inf_nan=False, extra="ignore", strict=True)


def observation_model(spec: PolicySpec, prefix: str = "") -> Any:
    """The typed body of /predict: one field per observation, bounds and descriptions included.
    `prefix` names the models of a policy apart from those of the others served beside it."""
    assert spec.observations is not None
    heads = _mask_heads(spec)
    fields = {
        obs.name: Annotated[_annotation(obs), _field_info(obs, heads if spec.action_mask == obs.name else None)]
        for obs in spec.observations
    }
    model: Any = TypedDict(f"{prefix}Observation", fields)  # type: ignore[operator]
    model.__pydantic_config__ = _OBSERVATION_CONFIG
    return model


def _annotation(obs: ObservationField) -> Any:
    scalar: Any = _PYTHON_TYPES[obs.kind]
    if obs.kind != "bool":
        bounds = Field(ge=_typed(obs.minimum, obs), le=_typed(obs.maximum, obs))
        if obs.kind == "int":
            scalar = Annotated[scalar, bounds, BeforeValidator(_whole_number_as_int), _WITHIN_RANGE]
        else:
            scalar = Annotated[scalar, bounds, _WITHIN_RANGE]
    return list[scalar] if obs.is_list else scalar


def _whole_number_as_int(value: Any) -> Any:
    """JSON has one number type, and JSON Schema's `integer` is any number without a fraction: 3.0
    is the integer 3. Everything else goes to the strict check as it came (3.5, true and "3" fail)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _typed(bound: float | None, obs: ObservationField) -> float | int | None:
    """Bounds of int fields as ints where whole, so the OpenAPI spec says `maximum: 3`, not 3.0."""
    return int(bound) if bound is not None and obs.kind == "int" and bound.is_integer() else bound


class _ShownWithinRange:
    """Annotated metadata: the JSON Schema of a number shows the range the server takes, the
    schema's bounds within FLOAT32_MAX or INT_LIMIT (which the row encoder enforces)."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        limit = INT_LIMIT if schema.get("type") == "integer" else FLOAT32_MAX
        schema["minimum"] = max(schema.get("minimum", -limit), -limit)
        schema["maximum"] = min(schema.get("maximum", limit), limit)
        return schema


_WITHIN_RANGE = _ShownWithinRange()


def _field_info(obs: ObservationField, heads: list[range] | None) -> Any:
    """`heads`: for the action mask, which of its entries belong to which head (_mask_heads)."""
    description = obs.description or ""
    if heads is not None:
        description = (description + " " if description else "") + "Action mask: true marks an allowed action; each head needs one."
    return Field(
        title=obs.name,
        description=description or None,
        min_length=obs.min_items if obs.is_list else None,
        max_length=obs.max_items if obs.is_list else None,
        examples=[example_value(obs)],
        json_schema_extra=None if heads is None else _each_head_allows_one(heads, {"const": True}),
    )


def _mask_heads(spec: PolicySpec) -> list[range] | None:
    """Which entries of the action mask belong to which discrete head (None: no mask).

    From the declared heads; an undeclared single head has the whole mask. Several heads read off
    the model are not known here: the whole mask stands for them (one allowed entry is then
    necessary, though not enough: the server's 422 names the head that has none)."""
    mask = next((obs for obs in spec.observations or () if obs.name == spec.action_mask), None)
    if mask is None or mask.width is None:
        return None
    sizes = [head.n for head in spec.actions or () if isinstance(head, DiscreteHead)] or [mask.width]
    return [range(start, stop) for start, stop in pairwise(accumulate(sizes, initial=0))]


def _each_head_allows_one(heads: list[range], allowed: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for an array (the mask, or the raw row that holds it) in which each head's
    entries include one that is `allowed`: the server answers 422 for a head that allows nothing."""
    one_per_head = [{"anyOf": [{"prefixItems": [{}] * index + [allowed]} for index in head]} for head in heads]
    return one_per_head[0] if len(one_per_head) == 1 else {"allOf": one_per_head}


def example_value(obs: ObservationField) -> Any:
    """A valid value: the middle of the bounds (or the one bound, or 0); lists of their minimum length."""
    if obs.kind == "bool":
        scalar: Any = True
    else:
        bounds = [b for b in (obs.minimum, obs.maximum) if b is not None]
        middle = sum(bounds) / len(bounds) if bounds else 0.0
        scalar = middle if obs.kind == "float" else _whole_number_within(middle, obs)
    if not obs.is_list:
        return scalar
    return [scalar] * (obs.min_items if obs.min_items is not None else 1)


def _whole_number_within(value: float, obs: ObservationField) -> int:
    whole = math.ceil(value)
    return whole if obs.maximum is None or whole <= obs.maximum else math.floor(value)


def example_observation(spec: PolicySpec) -> dict[str, Any]:
    return {obs.name: example_value(obs) for obs in spec.observations or ()}


EPISODE_KEYS = ("episode_id", "agent_id")  # an observation of a batch may name its episode and agent
_EPISODE_KEY_TYPES = {
    "episode_id": Annotated[
        str, StringConstraints(pattern=ID_PATTERN), Field(description=f"Logs this decision as a step of this episode ({ID_RULE}).")
    ],
    "agent_id": Annotated[
        str, StringConstraints(pattern=ID_PATTERN), Field(description="The agent of the episode this observation is of.")
    ],
}


def batch_model(observation: Any, prefix: str = "") -> type[BaseModel]:
    """The body of /predict_batch: observations that may each name their episode and agent (keys
    the schema's observations do not use already)."""
    own = {key: NotRequired[kind] for key, kind in _EPISODE_KEY_TYPES.items() if key not in observation.__annotations__}
    item: Any = TypedDict(f"{prefix}BatchObservation", {**observation.__annotations__, **own})  # type: ignore[operator]
    item.__pydantic_config__ = _OBSERVATION_CONFIG
    return create_model(
        f"{prefix}ObservationBatch",
        __config__=ConfigDict(strict=True),
        observations=(list[item], Field(description="Observations, one per agent; answered in the same order.")),  # type: ignore[valid-type]
    )


def episode_keys_of(observations: list[dict[str, Any]], spec: PolicySpec) -> list[tuple[str | None, str | None]] | None:
    """Each batch observation's (episode_id, agent_id), taken out of it (they are not the model's
    input); None when no observation names either."""
    names = {obs.name for obs in spec.observations or ()}
    keys = [key for key in EPISODE_KEYS if key not in names]
    if not any(key in observation for observation in observations for key in keys):
        return None
    return [tuple(observation.pop(key, None) if key in keys else None for key in EPISODE_KEYS) for observation in observations]  # type: ignore[misc]


_RAW_VALUE = Annotated[float, _WITHIN_RANGE]
# The policy allows an action whose mask entry, in the float32 row, is above 0.5: sent as a JSON
# number, above the midpoint between 0.5 and the next float32 (the midpoint itself rounds to 0.5).
_MASK_ENTRY_ALLOWED = {"exclusiveMinimum": (0.5 + float(np.nextafter(np.float32(0.5), np.float32(1)))) / 2}
_RAW_DESCRIPTION = "The model's input vector, as the model was trained on it."


class RawObservation(BaseModel):
    """The body of /predict_raw when the model's input size is not known (raw_observation_model)."""

    model_config = ConfigDict(allow_inf_nan=False, strict=True)
    obs: list[_RAW_VALUE] = Field(description=_RAW_DESCRIPTION, min_length=1)  # type: ignore[valid-type]


def raw_observation_model(spec: PolicySpec, model_input_size: int | None, prefix: str = "") -> type[RawObservation]:
    """The body of /predict_raw: a vector of the model's input size (the schema's, else what the
    model file says, when known), and each head's mask entries including one that allows an action.
    The spec then names every length and mask the server accepts."""
    size = spec.input_size or model_input_size
    if size is None:
        return RawObservation if not prefix else create_model(f"{prefix}RawObservation", __base__=RawObservation)
    heads = _mask_heads(spec)
    columns = spec.columns_of(spec.action_mask) if spec.action_mask is not None else None
    in_row = None if heads is None or columns is None else [range(h.start + columns.start, h.stop + columns.start) for h in heads]
    obs_field = Field(
        description=_RAW_DESCRIPTION,
        min_length=size,
        max_length=size,
        json_schema_extra=None if in_row is None else _each_head_allows_one(in_row, _MASK_ENTRY_ALLOWED),
    )
    return create_model(f"{prefix}RawObservation", __base__=RawObservation, obs=(list[_RAW_VALUE], obs_field))  # type: ignore[valid-type]


def decision_model(spec: PolicySpec, prefix: str = "") -> type[BaseModel]:
    """`{"actions", "probability"}`, typed by the kind of actions (what SDKs generate from)."""
    actions_type = list[int] if spec.discrete else list[float]
    return create_model(
        f"{prefix}Decision",
        actions=(actions_type, Field(description="One action per discrete head; all values of each continuous head.")),
        probability=(float | None, Field(description="Joint probability of these actions (null for continuous actions).")),
    )


class HeadDistribution(BaseModel):
    name: str
    labels: list[str] | None = Field(default=None, description="Discrete heads: the action labels, when declared.")
    probabilities: list[float] | None = Field(default=None, description="Discrete heads: one per action; masked actions are exactly 0.")
    mean: list[float] | None = Field(default=None, description="Continuous heads: the Gaussian's mean.")
    std: list[float] | None = Field(default=None, description="Continuous heads: its standard deviation (null when the model gives none).")


class Distribution(BaseModel):
    heads: list[HeadDistribution]


def batch_decisions_model(decision: type[BaseModel], prefix: str = "") -> type[BaseModel]:
    return create_model(f"{prefix}BatchDecisions", results=(list[decision], ...))  # type: ignore[valid-type]


class RowEncoder:
    """Validated observations → one float32 matrix, in schema order (bools as 1.0/0.0)."""

    def __init__(self, spec: PolicySpec) -> None:
        assert spec.observations is not None
        self._list_flags = tuple(obs.is_list for obs in spec.observations)
        self._has_lists = any(self._list_flags)

    def encode(self, observations: Sequence[dict[str, Any]]) -> np.ndarray:
        if self._has_lists:
            rows = [self._flatten(obs) for obs in observations]
            if len({len(row) for row in rows}) > 1:
                raise InputError(("body",), "observations give rows of different lengths", "list_lengths")
        else:
            rows = [list(obs.values()) for obs in observations]
        return float32_rows(rows, ("body",))

    def _flatten(self, observation: dict[str, Any]) -> list[Any]:
        values = observation.values()
        return list(chain.from_iterable(v if is_list else (v,) for v, is_list in zip(values, self._list_flags, strict=True)))


class PlainBatchReader:
    """The rows of a /predict_batch body, read without pydantic when the body is plainly valid.

    A pydantic model per observation costs more than the policy's forward pass on a batch
    (bench/RESULTS.md, "How the targets were reached"). For a schema of scalar numbers only, the
    body is parsed with orjson and checked column by column instead: every observation an object
    with every field, every value a JSON number within the field's bounds (ints whole), all
    within ±INT_LIMIT. `rows` gives None for anything else, and the caller validates the body as
    usual, whose 422 says what is wrong; so this accepts only what the model accepts (a subset:
    what it leaves, such as a huge number orjson reads as a float, the model judges).
    """

    _NUMBER_TYPES = frozenset({int, float})
    _EPISODE_KEYS = tuple(f'"{key}"'.encode() for key in EPISODE_KEYS)

    def __init__(self, fields: Sequence[ObservationField]) -> None:
        names = [obs.name for obs in fields]
        getter = operator.itemgetter(*names)
        self._values_of: Callable[[Any], tuple[Any, ...]] = getter if len(names) > 1 else lambda observation: (getter(observation),)
        self._width = len(names)
        bounds = [(obs.minimum, obs.maximum) for obs in fields]
        self._lows = np.array([-INT_LIMIT if low is None else max(low, -INT_LIMIT) for low, _ in bounds])
        self._highs = np.array([INT_LIMIT if high is None else min(high, INT_LIMIT) for _, high in bounds])
        self._int_columns = np.array([obs.kind == "int" for obs in fields])

    @classmethod
    def of(cls, spec: PolicySpec) -> "PlainBatchReader | None":
        """A reader for a schema whose observations are all float or int scalars, else None."""
        fields = spec.observations or ()
        if not fields or any(obs.is_list or obs.kind == "bool" for obs in fields):
            return None
        return cls(fields)

    def rows(self, body: bytes) -> np.ndarray | None:
        """The float32 rows, in schema order; None if the body is not plainly valid (or empty), or
        may name episodes (the model reads those)."""
        if any(key in body for key in self._EPISODE_KEYS):
            return None
        try:
            observations = orjson.loads(body)["observations"]
            values = list(map(self._values_of, observations))
        except (orjson.JSONDecodeError, KeyError, TypeError):  # not JSON, a field or "observations" missing, not objects
            return None
        if type(observations) is not list or not values:
            return None
        flat = list(chain.from_iterable(values))
        if not set(map(type, flat)) <= self._NUMBER_TYPES:  # bools, strings, nulls, lists: the model says which
            return None
        matrix = np.array(flat, dtype=np.float64).reshape(len(values), self._width)
        outside = (matrix < self._lows) | (matrix > self._highs)
        fractional = self._int_columns & (matrix != np.floor(matrix))
        if (outside | fractional).any():
            return None
        return matrix.astype(np.float32)


def raw_rows(raw: RawObservation) -> np.ndarray:
    return float32_rows([raw.obs], ("body", "obs"))


def float32_rows(rows: list[list[Any]], loc: tuple[str, ...]) -> np.ndarray:
    """A float32 matrix, refusing a value out of the spec's range (FLOAT32_MAX, INT_LIMIT)."""
    try:
        matrix = np.array(rows, dtype=np.float64).reshape(len(rows), -1)
    except OverflowError:  # an int too large even for float64
        matrix = np.full((1, 1), np.inf)
    peak = np.abs(matrix).max(initial=0.0)  # finite: NaN and infinities were refused by validation
    if peak > INT_LIMIT and (peak > FLOAT32_MAX or _an_int_beyond_limit(rows)):
        raise InputError(
            loc, f"a value is out of range: floats go up to ±{FLOAT32_MAX:.8g} (float32), ints to ±{INT_LIMIT}", "out_of_range"
        )
    return matrix.astype(np.float32)


def _an_int_beyond_limit(rows: list[list[Any]]) -> bool:
    """Whether a value past INT_LIMIT is an int (floats may go further), on the ints themselves."""
    return any(isinstance(value, int) and abs(value) > INT_LIMIT for row in rows for value in row)
