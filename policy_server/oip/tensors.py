"""OIP tensors: the datatypes, a tensor as a typed numpy array, and its wire forms.

A tensor arrives as JSON values (REST), as raw little-endian bytes (REST's binary extension,
gRPC's `raw_input_contents`) or as gRPC's typed contents, and leaves the same ways. Every form
is checked here: the element count against the shape, the values against the datatype. What
the values mean (which observation, its bounds) is `models`' concern.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.oip.errors import bad_request

# Each OIP datatype and its little-endian numpy dtype. BYTES (strings) is not an input any policy
# takes: it is refused by name.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
INTEGER_TYPES = frozenset(name for name, dtype in DTYPES.items() if dtype.kind in "iu")
FLOAT_TYPES = frozenset(name for name, dtype in DTYPES.items() if dtype.kind == "f")
MAX_DIMENSIONS = 8


@dataclass(frozen=True)
class Tensor:
    """A named tensor: `values` has `shape` and the dtype of `datatype`."""

    name: str
    datatype: str
    values: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.values.shape)

    def to_bytes(self) -> bytes:
        """The raw form: the elements in row-major order, little-endian."""
        return np.ascontiguousarray(self.values, dtype=DTYPES[self.datatype]).tobytes()

    def to_list(self) -> list[Any]:
        """The JSON form: the elements flat, in row-major order (OIP's `data`)."""
        return self.values.reshape(-1).tolist()


def checked_shape(name: str, shape: Any) -> tuple[int, ...]:
    """`shape` as a tuple of non-negative ints, or a 400 saying what is wrong with it."""
    if not isinstance(shape, list | tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise bad_request(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_DIMENSIONS:
        raise bad_request(f"input '{name}': shape {list(shape)} has more than {MAX_DIMENSIONS} dimensions")
    return tuple(shape)


def checked_datatype(name: str, datatype: Any) -> str:
    if datatype == "BYTES":
        raise bad_request(f"input '{name}': datatype BYTES is not taken: send numbers ({', '.join(DTYPES)})")
    if datatype not in DTYPES:
        raise bad_request(f"input '{name}': unknown datatype {datatype!r}: the datatypes are {', '.join(DTYPES)}")
    return str(datatype)


def from_bytes(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes, whose size must be exactly the shape's."""
    dtype = DTYPES[datatype]
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise bad_request(f"input '{name}': {len(raw)} bytes of data, but shape {list(shape)} of {datatype} needs {count * dtype.itemsize}")
    values = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and values.view(np.uint8).max(initial=0) > 1:
        raise bad_request(f"input '{name}': BOOL bytes must be 0 or 1")
    return Tensor(name, datatype, values)


def from_values(name: str, datatype: str, shape: Sequence[int], data: Any) -> Tensor:
    """A tensor from JSON values (flat or nested as the shape), each of the datatype's JSON type:
    true/false for BOOL, whole numbers for the integer types, numbers for the float types."""
    flat = _flattened(name, data)
    count = math.prod(shape)
    if len(flat) != count:
        raise bad_request(f"input '{name}': {len(flat)} values, but shape {list(shape)} holds {count}")
    kinds = set(map(type, flat))
    if datatype == "BOOL":
        if not kinds <= {bool}:
            raise bad_request(f"input '{name}': BOOL values must be true or false")
    elif bool in kinds or not kinds <= {int, float}:
        raise bad_request(f"input '{name}': {datatype} values must be numbers")
    elif datatype in INTEGER_TYPES and float in kinds and not all(float(v).is_integer() for v in flat):
        raise bad_request(f"input '{name}': {datatype} values must be whole numbers")
    return Tensor(name, datatype, _typed_array(name, datatype, flat).reshape(shape))


def _flattened(name: str, data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise bad_request(f"input '{name}': data must be a list of values")
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flattened(name, item) if isinstance(item, list) else (item,))
    return flat


def _typed_array(name: str, datatype: str, flat: list[Any]) -> np.ndarray:
    dtype = DTYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise bad_request(f"input '{name}': a value is out of the range of {datatype} ({info.min} to {info.max})")
        return np.array(flat, dtype=dtype)
    with np.errstate(over="ignore"):
        values = np.array(flat, dtype=dtype)
    if not np.isfinite(values).all():
        raise bad_request(f"input '{name}': a value is out of the range of {datatype}")
    return values
