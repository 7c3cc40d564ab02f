"""An OIP inference request and its answer, as typed values both transports build and read."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policy_server.experience.episodes import is_valid_id
from policy_server.oip.errors import bad_request
from policy_server.oip.tensors import Tensor

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request names; `binary` (REST): sent as raw bytes after the JSON header."""

    name: str
    binary: bool | None = None  # None: as the request's `binary_data_output` says


@dataclass(frozen=True)
class InferParameters:
    """The request parameters a policy reads; any other parameter (tritonclient's `priority`,
    `timeout`, ...) is ignored, as OIP servers do with parameters they do not know."""

    deterministic: bool = False
    seed: int | None = None
    sequence_id: str | None = None  # the episode (DESIGN.md section 11), named by the client
    sequence_start: bool = False
    sequence_end: bool = False
    binary_data_output: bool = False

    @classmethod
    def of(cls, parameters: Mapping[str, Any]) -> "InferParameters":
        """Read from a request's `parameters`, with a 400 naming any of them of the wrong type."""
        seed = parameters.get("seed")
        if seed is not None and (type(seed) is not int or not 0 <= seed <= MAX_SEED):
            raise bad_request(f"parameter 'seed' must be an integer from 0 to {MAX_SEED}, got {seed!r}")
        return cls(
            deterministic=_flag(parameters, "deterministic"),
            seed=seed,
            sequence_id=_sequence_id(parameters.get("sequence_id")),
            sequence_start=_flag(parameters, "sequence_start"),
            sequence_end=_flag(parameters, "sequence_end"),
            binary_data_output=_flag(parameters, "binary_data_output"),
        )


def _flag(parameters: Mapping[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if type(value) is not bool:
        raise bad_request(f"parameter '{name}' must be true or false, got {value!r}")
    return value


def _sequence_id(value: Any) -> str | None:
    """tritonclient sends a sequence id as a number (0: no sequence) or a string; both name the
    episode, in the experience log's id form."""
    if value is None or value == 0 or value == "":
        return None
    if type(value) is int and value > 0:
        return str(value)
    if isinstance(value, str) and is_valid_id(value):
        return value
    raise bad_request(f"parameter 'sequence_id' must be a positive integer or an id of letters, digits and ._:- (1-128), got {value!r}")


@dataclass(frozen=True)
class InferRequest:
    inputs: Sequence[Tensor]
    parameters: InferParameters = InferParameters()
    outputs: Sequence[RequestedOutput] | None = None  # None: the model's default outputs
    id: str | None = None


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: Sequence[Tensor]
    id: str | None = None
