"""The request and response models built from a `PolicySpec`, and observations → float32 rows.

Split from schema.py because it is the other half of the contract: schema.py reads the file,
this module turns the result into the pydantic models FastAPI validates and documents with, and
into the one vector op per request that makes rows.
"""

import math
from collections.abc import Sequence
from itertools import chain
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model
from typing_extensions import TypedDict

from policy_server.errors import InputError
from policy_server.schema import ObservationField, PolicySpec

_PYTHON_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool}

# An observation is a TypedDict: validated into a plain dict in schema order, it costs a third of
# a model instance (1,024 observations: ~1.1 ms instead of ~2.6 ms), and its keys are the schema's
# names, any string (a field called "model_config" or "max-speed" works too). Extra keys are
# dropped: the original's clients send every observation they have.
_OBSERVATION_CONFIG = ConfigDict(allow_inf_nan=False, extra="ignore")


def observation_model(spec: PolicySpec) -> Any:
    """The typed body of /predict: one field per observation, bounds and descriptions included."""
    assert spec.observations is not None
    fields = {obs.name: Annotated[_annotation(obs), _field_info(obs, spec.action_mask == obs.name)] for obs in spec.observations}
    model: Any = TypedDict("Observation", fields)  # type: ignore[operator]
    model.__pydantic_config__ = _OBSERVATION_CONFIG
    return model


def _annotation(obs: ObservationField) -> Any:
    scalar: Any = _PYTHON_TYPES[obs.kind]
    if obs.kind != "bool" and (obs.minimum is not None or obs.maximum is not None):
        scalar = Annotated[scalar, Field(ge=_typed(obs.minimum, obs), le=_typed(obs.maximum, obs))]
    return list[scalar] if obs.is_list else scalar


def _typed(bound: float | None, obs: ObservationField) -> float | int | None:
    """Bounds of int fields as ints where whole, so the OpenAPI spec says `maximum: 3`, not 3.0."""
    return int(bound) if bound is not None and obs.kind == "int" and bound.is_integer() else bound


def _field_info(obs: ObservationField, is_mask: bool) -> Any:
    description = obs.description or ""
    if is_mask:
        description = (description + " " if description else "") + "Action mask: true marks an allowed action."
    return Field(
        title=obs.name,
        description=description or None,
        min_length=obs.min_items if obs.is_list else None,
        max_length=obs.max_items if obs.is_list else None,
        examples=[example_value(obs)],
    )


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


def batch_model(observation: Any) -> type[BaseModel]:
    return create_model(
        "ObservationBatch",
        observations=(list[observation], Field(description="Observations, one per agent; answered in the same order.")),  # type: ignore[valid-type]
    )


class RawObservation(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    obs: list[float] = Field(description="The model's input vector, as the model was trained on it.", min_length=1)


def decision_model(spec: PolicySpec) -> type[BaseModel]:
    """`{"actions", "probability"}`, typed by the kind of actions (what SDKs generate from)."""
    actions_type = list[int] if spec.discrete else list[float]
    return create_model(
        "Decision",
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


def batch_decisions_model(decision: type[BaseModel]) -> type[BaseModel]:
    return create_model("BatchDecisions", results=(list[decision], ...))  # type: ignore[valid-type]


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


def raw_rows(raw: RawObservation) -> np.ndarray:
    return float32_rows([raw.obs], ("body", "obs"))


def float32_rows(rows: list[list[Any]], loc: tuple[str, ...]) -> np.ndarray:
    """A float32 matrix, refusing values beyond float32's range (they would reach the model as inf)."""
    try:
        with np.errstate(over="ignore"):
            matrix = np.array(rows, dtype=np.float32).reshape(len(rows), -1)
    except OverflowError:  # an int too large even for float64
        matrix = np.full((1, 1), np.inf, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise InputError(loc, "a value is beyond float32's range (about ±3.4e38)", "out_of_range")
    return matrix
