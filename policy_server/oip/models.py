"""A served policy seen as an OIP model: its metadata, its readiness and `infer`.

Inputs are one tensor per schema observation, named as in the schema (scalars `[B]` or `[B, 1]`,
lists `[B, n]`), or one raw `obs` tensor `[B, D]`. They are checked as strictly as the typed
routes check JSON (datatype, shape, bounds, finite values), and become the same float32 rows:
the same `Decider` decides them, so OIP, REST and gRPC requests share forward passes and answer
alike. Outputs: `actions` (INT64 `[B, heads]`; continuous FP32 `[B, values]`), `probability`
(FP64 `[B]`, discrete policies), and on request each head's distribution
(`<head>_probabilities`, or `<head>_mean` and `<head>_std`).
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from policy_server import __version__
from policy_server.experience.episodes import SINGLE_AGENT, AgentRef
from policy_server.observations import FLOAT32_MAX, INT_LIMIT
from policy_server.oip.errors import OipError, bad_request
from policy_server.oip.inference import InferParameters, InferRequest, InferResponse
from policy_server.oip.tensors import FLOAT_TYPES, INTEGER_TYPES, Tensor
from policy_server.policy import Decisions, Distributions, Kind, Task
from policy_server.schema import ObservationField

if TYPE_CHECKING:
    from policy_server.http.experience_routes import Decider
    from policy_server.http.keys import KeyCheck

RAW_INPUT = "obs"
SERVER_NAME = "policy-server"
PLATFORM = "policy-server"
EXTENSIONS = ("binary_tensor_data", "sequence", "parameters")


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class PolicyShape:
    input_size: int | None
    heads: tuple[dict[str, Any], ...]  # as `describe_head` gives them


@dataclass(frozen=True)
class ServerMetadata:
    name: str = SERVER_NAME
    version: str = __version__
    extensions: tuple[str, ...] = EXTENSIONS


class OipModel:
    """One policy under OIP: what its metadata says, and its decisions for OIP requests."""

    def __init__(self, decider: "Decider", key_check: "KeyCheck | None") -> None:
        self.decider = decider
        self.served = decider.served
        self.key_check = key_check  # None: auth off
        self._shape: tuple[str, PolicyShape] | None = None  # of the active version, once started

    @property
    def name(self) -> str:
        return self.served.name

    def ready(self, version: str | None = None) -> bool:
        return self.served.executor.ready and (version is None or version == self.served.active)

    def metadata(self, version: str | None = None) -> ModelMetadata:
        self._check_version(version, for_infer=False)
        versions = tuple(sorted(self.served.versions, key=int)) or (self.served.active,)
        return ModelMetadata(self.name, versions, PLATFORM, self._input_metadata(), self._output_metadata())

    async def infer(self, request: InferRequest, version: str | None = None) -> InferResponse:
        self._check_version(version, for_infer=True)
        rows = self._rows(request.inputs)
        wanted = self._wanted_outputs(request)
        parameters = request.parameters
        kind = Kind.DETERMINISTIC if parameters.deterministic else Kind.SAMPLE
        decisions, _ = await self.decider.decide(rows, kind, parameters.seed, _agents(parameters, len(rows)), parameters.sequence_start)
        outputs = self._decision_outputs(decisions, wanted)
        if any(name not in outputs for name in wanted):
            outputs |= await self._distribution_outputs(rows)
        return InferResponse(self.name, decisions.version, [outputs[name] for name in wanted], request.id)

    # --- versions ---------------------------------------------------------------------------

    def _check_version(self, version: str | None, *, for_infer: bool) -> None:
        if version is None or version == self.served.active:
            return
        if version not in self.served.versions:
            raise OipError(404, f"model '{self.name}' has no version '{version}': its versions are {', '.join(self._labels())}")
        if for_infer:
            raise OipError(
                400,
                f"model '{self.name}' version {version} is not the one served (version {self.served.active} is): "
                f"switch with PUT /policies/{self.name}/active (the operator key), or leave the version out",
            )

    def _labels(self) -> list[str]:
        return sorted(self.served.versions, key=int) or [self.served.active]

    # --- inputs -----------------------------------------------------------------------------

    def _fields(self) -> tuple[ObservationField, ...]:
        return self.served.spec.observations or ()

    def _policy_shape(self) -> "PolicyShape":
        """The active version's input size and heads, asked of the executor once per version
        (`describe()` is not free: the ray executor's is what its replicas last said)."""
        served = self.served
        if not served.executor.ready:
            return PolicyShape(served.spec.input_size, ())
        if self._shape is None or self._shape[0] != served.active:
            info = served.executor.describe()
            self._shape = served.active, PolicyShape(info.get("input_size"), tuple(info.get("heads") or ()))
        return self._shape[1]

    def _input_size(self) -> int | None:
        return self._policy_shape().input_size

    def _input_metadata(self) -> tuple[TensorMetadata, ...]:
        fields = self._fields()
        if not fields:
            return (TensorMetadata(RAW_INPUT, "FP32", (-1, self._input_size() or -1)),)
        return tuple(TensorMetadata(obs.name, _DATATYPE_OF_KIND[obs.kind], _shape_of(obs)) for obs in fields)

    def _rows(self, inputs: Sequence[Tensor]) -> np.ndarray:
        names = [tensor.name for tensor in inputs]
        if len(set(names)) < len(names):
            raise bad_request(f"inputs name {sorted({n for n in names if names.count(n) > 1})} more than once")
        fields = self._fields()
        if RAW_INPUT in names and RAW_INPUT not in {obs.name for obs in fields}:
            if len(inputs) > 1:
                raise bad_request(f"input '{RAW_INPUT}' is the whole row: send it alone, or one input per observation instead")
            return _raw_rows(inputs[0], self._input_size())
        if not fields:
            raise bad_request(f"this policy takes one input '{RAW_INPUT}' (FP32 [batch, {self._input_size() or 'D'}])")
        by_name = dict(zip(names, inputs, strict=True))
        missing = [obs.name for obs in fields if obs.name not in by_name]
        unknown = [name for name in names if name not in {obs.name for obs in fields}]
        if missing or unknown:
            expected = ", ".join(obs.name for obs in fields)
            raise bad_request(_naming(missing, "missing") + _naming(unknown, "unknown") + f"the inputs are {expected} (or '{RAW_INPUT}')")
        columns = [_field_columns(obs, by_name[obs.name]) for obs in fields]
        batches = {len(column) for column in columns}
        if len(batches) > 1:
            raise bad_request(f"inputs give different batch sizes {sorted(batches)}: every input's first dimension is the batch")
        if batches == {0}:
            raise bad_request("the batch is empty: send at least one observation")
        return np.concatenate(columns, axis=1)

    # --- outputs ----------------------------------------------------------------------------

    def _heads(self) -> tuple[dict[str, Any], ...]:
        return self._policy_shape().heads

    def _output_metadata(self) -> tuple[TensorMetadata, ...]:
        return tuple(self._output_shapes().values())

    def _output_shapes(self) -> dict[str, TensorMetadata]:
        heads = self._heads()
        outputs: dict[str, TensorMetadata] = {}
        if self.served.spec.discrete:
            outputs["actions"] = TensorMetadata("actions", "INT64", (-1, len(heads) or -1))
            outputs["probability"] = TensorMetadata("probability", "FP64", (-1,))
        else:
            outputs["actions"] = TensorMetadata("actions", "FP32", (-1, sum(head["size"] for head in heads) or -1))
        for head in heads:
            for name, width in _distribution_outputs_of(head):
                outputs[name] = TensorMetadata(name, "FP64", (-1, width))
        return outputs

    def _wanted_outputs(self, request: InferRequest) -> list[str]:
        known = self._output_shapes()
        if request.outputs is None:
            return [name for name in ("actions", "probability") if name in known]
        names = [output.name for output in request.outputs]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise bad_request(f"unknown output {', '.join(map(repr, unknown))}: the outputs are {', '.join(known)}")
        if len(set(names)) < len(names):
            raise bad_request("an output is requested more than once")
        return names

    def _decision_outputs(self, decisions: Decisions, wanted: list[str]) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        if "actions" in wanted:
            values = decisions.action_values if decisions.action_values is not None else np.array(decisions.actions)
            if self.served.spec.discrete:
                outputs["actions"] = Tensor("actions", "INT64", values.astype(np.int64))
            else:
                outputs["actions"] = Tensor("actions", "FP32", values.astype(np.float32))
        if "probability" in wanted:
            outputs["probability"] = Tensor("probability", "FP64", np.array(decisions.probabilities, dtype=np.float64))
        return outputs

    async def _distribution_outputs(self, rows: np.ndarray) -> dict[str, Tensor]:
        if self.served.memory is not None:  # its distribution is the episode state's, which the decision just advanced
            raise bad_request(
                "a recurrent policy's distribution outputs are not served here: ask /distribution?episode_id=... before the step"
            )
        result = await self.served.admission.run(Task(rows, Kind.DISTRIBUTION))
        assert isinstance(result, Distributions)
        outputs = {}
        for index, head in enumerate(self._heads()):
            for name, _ in _distribution_outputs_of(head):
                entry = name.removeprefix(head["name"] + "_")  # probabilities, mean or std
                values = np.array([row[index][entry] for row in result.rows], dtype=np.float64)
                outputs[name] = Tensor(name, "FP64", values)
        return outputs


class OipModels:
    """The OIP models served now, by name: kept in step with the route table (table.py), read by
    both transports."""

    def __init__(self) -> None:
        self._models: dict[str, OipModel] = {}

    def put(self, model: OipModel) -> None:
        self._models[model.name] = model

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def __iter__(self) -> Iterator[OipModel]:
        return iter(list(self._models.values()))

    def get(self, name: str) -> OipModel:
        model = self._models.get(name)
        if model is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise OipError(404, f"unknown model '{name}': the models served are {served}")
        return model

    @property
    def ready(self) -> bool:
        return bool(self._models) and all(model.ready() for model in self._models.values())


_DATATYPE_OF_KIND = {"float": "FP32", "int": "INT64", "bool": "BOOL"}


def _shape_of(obs: ObservationField) -> tuple[int, ...]:
    return (-1, obs.width or -1) if obs.is_list else (-1,)


def _distribution_outputs_of(head: dict[str, Any]) -> list[tuple[str, int]]:
    if head["kind"] == "discrete":
        return [(f"{head['name']}_probabilities", head["n"])]
    return [(f"{head['name']}_mean", head["size"]), (f"{head['name']}_std", head["size"])]


def _naming(names: list[str], what: str) -> str:
    return f"{what} input{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}; " if names else ""


def _agents(parameters: InferParameters, count: int) -> list[AgentRef | None] | None:
    """A sequence's rows: one agent (a request of one row), else agent "0", "1", ... by row."""
    episode = parameters.sequence_id
    if episode is None:
        return None
    if count == 1:
        return [AgentRef(episode, SINGLE_AGENT)]
    return [AgentRef(episode, str(row)) for row in range(count)]


def _raw_rows(tensor: Tensor, input_size: int | None) -> np.ndarray:
    if tensor.datatype not in FLOAT_TYPES | INTEGER_TYPES:
        raise bad_request(f"input '{RAW_INPUT}': datatype {tensor.datatype} is not taken: send FP32")
    if len(tensor.shape) != 2 or (input_size is not None and tensor.shape[1] != input_size):
        raise bad_request(f"input '{RAW_INPUT}': shape {list(tensor.shape)} is not [batch, {input_size or 'D'}]")
    if tensor.shape[0] == 0:
        raise bad_request("the batch is empty: send at least one observation")
    return _as_float32(tensor, tensor.values)


def _field_columns(obs: ObservationField, tensor: Tensor) -> np.ndarray:
    """The field's columns of the rows, [B, width], after every check the typed routes make."""
    values = _field_shaped(obs, tensor)
    _check_datatype(obs, tensor)
    if obs.kind != "bool":
        low = -INT_LIMIT if obs.kind == "int" else -FLOAT32_MAX
        high = INT_LIMIT if obs.kind == "int" else FLOAT32_MAX
        low = low if obs.minimum is None else max(low, obs.minimum)
        high = high if obs.maximum is None else min(high, obs.maximum)
        if values.size and (values.min() < low or values.max() > high):
            raise bad_request(f"input '{obs.name}': a value is outside [{_shown(low)}, {_shown(high)}]")
    return _as_float32(tensor, values)


def _field_shaped(obs: ObservationField, tensor: Tensor) -> np.ndarray:
    shape = tensor.shape
    if not obs.is_list:
        if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
            return tensor.values.reshape(-1, 1)
        raise bad_request(f"input '{obs.name}': shape {list(shape)} is not [batch] or [batch, 1] (one value per observation)")
    if len(shape) != 2:
        raise bad_request(f"input '{obs.name}': shape {list(shape)} is not [batch, items] (a list per observation)")
    items = shape[1]
    if (obs.min_items is not None and items < obs.min_items) or (obs.max_items is not None and items > obs.max_items):
        raise bad_request(f"input '{obs.name}': {items} items per observation, outside {obs.min_items or 0} to {obs.max_items or 'any'}")
    return tensor.values


def _check_datatype(obs: ObservationField, tensor: Tensor) -> None:
    allowed = {"bool": {"BOOL"}, "int": INTEGER_TYPES, "float": FLOAT_TYPES | INTEGER_TYPES}[obs.kind]
    if tensor.datatype not in allowed:
        kinds = {"bool": "BOOL", "int": "an integer datatype (INT64, INT32, ...)", "float": "FP32 (or another number datatype)"}
        raise bad_request(f"input '{obs.name}': datatype {tensor.datatype} does not fit a {obs.kind} observation: send {kinds[obs.kind]}")


def _as_float32(tensor: Tensor, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise bad_request(f"input '{tensor.name}': values must be finite (no NaN or infinity)")
    if values.dtype.kind in "iu" and values.size and np.abs(values.astype(np.float64)).max() > INT_LIMIT:
        raise bad_request(f"input '{tensor.name}': an integer is beyond ±{INT_LIMIT}")
    if values.dtype == np.float64 and values.size and np.abs(values).max() > FLOAT32_MAX:
        raise bad_request(f"input '{tensor.name}': a value is beyond float32's range (±{FLOAT32_MAX:.8g})")
    return values.astype(np.float32, copy=False)


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) <= INT_LIMIT else f"{bound:.8g}"
