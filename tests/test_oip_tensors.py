"""OIP tensors and parameters in-process: each wire form read back as sent, each mistake a 400."""

import re

import numpy as np
import pytest

from policy_server.oip.errors import OipError
from policy_server.oip.inference import MAX_SEED, InferParameters
from policy_server.oip.tensors import DTYPES, Tensor, checked_datatype, checked_shape, from_bytes, from_values


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_bytes_and_values_give_the_same_tensor(datatype: str) -> None:
    values = np.array([[1, 0, 1], [0, 1, 1]]).astype(DTYPES[datatype])
    sent = Tensor("x", datatype, values)
    from_raw = from_bytes("x", datatype, [2, 3], sent.to_bytes())
    from_json = from_values("x", datatype, [2, 3], sent.to_list())
    assert from_raw.shape == from_json.shape == (2, 3)
    assert np.array_equal(from_raw.values, values) and np.array_equal(from_json.values, values)


def test_nested_data_is_read_in_row_major_order() -> None:
    assert from_values("x", "FP32", [2, 2], [[1, 2], [3, 4]]).values.tolist() == [[1, 2], [3, 4]]
    assert from_values("x", "INT64", [2, 2], [1, 2, 3, 4]).values.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("INT8", [1], [300], "out of the range of INT8"),
        ("UINT8", [1], [-1], "out of the range of UINT8"),
        ("INT64", [1], [2.5], "whole numbers"),
        ("FP16", [1], [1e6], "out of the range of FP16"),
        ("BOOL", [1], [1], "true or false"),
        ("FP32", [1], ["1"], "must be numbers"),
        ("FP32", [2], [1.0], "1 values, but shape [2] holds 2"),
        ("FP32", [1], 1.0, "data must be a list"),
    ],
)
def test_json_values_of_the_wrong_kind_are_refused(datatype: str, shape: list[int], data: object, message: str) -> None:
    with pytest.raises(OipError, match=re.escape(message)) as refused:
        from_values("x", datatype, shape, data)
    assert refused.value.status == 400


def test_raw_bytes_are_checked_against_shape_and_bool() -> None:
    with pytest.raises(OipError, match="3 bytes of data, but shape \\[1\\] of FP32 needs 4"):
        from_bytes("x", "FP32", [1], b"abc")
    with pytest.raises(OipError, match="BOOL bytes must be 0 or 1"):
        from_bytes("x", "BOOL", [2], b"\x00\x02")


def test_shapes_and_datatypes() -> None:
    assert checked_shape("x", [0, 3]) == (0, 3)
    for shape in ([1.5], "2", [True], [1] * 9):
        with pytest.raises(OipError):
            checked_shape("x", shape)
    with pytest.raises(OipError, match="BYTES is not taken"):
        checked_datatype("x", "BYTES")


def test_parameters() -> None:
    parameters = InferParameters.of({"seed": MAX_SEED, "deterministic": True, "sequence_id": 7, "priority": 3})
    assert (parameters.seed, parameters.deterministic, parameters.sequence_id) == (MAX_SEED, True, "7")
    assert InferParameters.of({"sequence_id": 0}).sequence_id is None  # tritonclient's "no sequence"
    assert InferParameters.of({"sequence_id": "robot-1:arm"}).sequence_id == "robot-1:arm"
    for bad in ({"seed": -1}, {"seed": MAX_SEED + 1}, {"seed": True}, {"sequence_id": "a b"}, {"sequence_start": 1}):
        with pytest.raises(OipError):
            InferParameters.of(bad)
