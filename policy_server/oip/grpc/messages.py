"""OIP's gRPC messages to and from the protocol-neutral values (`InferRequest`, `InferResponse`,
metadata): the gRPC counterpart of what `http.oip_routes` does with JSON.

An input's elements come as one `raw_input_contents` entry per input (what tritonclient sends)
or as the typed list of its datatype in `contents`; outputs always leave as
`raw_output_contents`, which is what tritonclient reads.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import Message

from policy_server.oip.errors import bad_request
from policy_server.oip.grpc import inference_pb2 as pb
from policy_server.oip.inference import InferParameters, InferRequest, InferResponse, RequestedOutput
from policy_server.oip.models import ModelMetadata, ServerMetadata, TensorMetadata
from policy_server.oip.tensors import DTYPES, Tensor, checked_datatype, checked_shape, from_bytes

# The typed list each datatype's elements travel in (FP16 has none: raw bytes only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

# What each typed list holds on the wire.
_WIRE_DTYPE = {
    "bool_contents": np.dtype("?"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as an InferRequest, every input checked (a 400 naming what is wrong)."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs: send one per input, in order")
    inputs = [_input_tensor(item, raw[index] if raw else None) for index, item in enumerate(message.inputs)]
    outputs = [RequestedOutput(output.name) for output in message.outputs] or None
    return InferRequest(inputs, InferParameters.of(parameter_values(message.parameters)), outputs, message.id or None)


def parameter_values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """The parameters as plain values (bool, int, str, float), as `InferParameters.of` reads them."""
    values = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[name] = getattr(parameter, choice)
    return values


def _input_tensor(item: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name = item.name
    shape = checked_shape(name, list(item.shape))
    datatype = checked_datatype(name, item.datatype)
    typed = [field.name for field, _ in item.contents.ListFields()]
    if raw is not None:
        if typed:
            raise bad_request(f"input '{name}': its elements are in raw_input_contents and in contents: send them once")
        return from_bytes(name, datatype, shape, raw)
    return _contents_tensor(name, datatype, shape, item.contents, typed)


def _contents_tensor(name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents, typed: list[str]) -> Tensor:
    expected = CONTENTS_FIELD.get(datatype)
    if expected is None:
        raise bad_request(f"input '{name}': {datatype} elements have no typed contents: send them in raw_input_contents")
    if typed and typed != [expected]:
        raise bad_request(f"input '{name}': {datatype} elements go in contents.{expected}, not in {', '.join(typed)}")
    values = np.asarray(getattr(contents, expected), dtype=_WIRE_DTYPE[expected])
    count = math.prod(shape)
    if values.size != count:
        raise bad_request(f"input '{name}': {values.size} values in contents.{expected}, but shape {list(shape)} holds {count}")
    dtype = DTYPES[datatype]
    if dtype.kind in "iu" and dtype != values.dtype and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise bad_request(f"input '{name}': a value is out of the range of {datatype} ({info.min} to {info.max})")
    return Tensor(name, datatype, values.astype(dtype, copy=False).reshape(shape))


def infer_response(response: InferResponse) -> pb.ModelInferResponse:
    """The answer with each output's elements in `raw_output_contents`, in the outputs' order."""
    return pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or "",
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in response.outputs],
        raw_output_contents=[tensor.to_bytes() for tensor in response.outputs],
    )


def model_metadata(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=_tensor_metadata(metadata.inputs),
        outputs=_tensor_metadata(metadata.outputs),
    )


def _tensor_metadata(tensors: Sequence[TensorMetadata]) -> list[Message]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors]


def server_metadata(metadata: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)
