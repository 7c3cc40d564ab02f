"""OIP over REST (DESIGN.md section 12): `/v2`, health, model metadata and readiness, `infer`.

The routes are plain ASGI endpoints rather than FastAPI's: the protocol has its own spec and
error form (`{"error": ...}`), and its bodies are JSON or JSON plus raw tensor bytes (the binary
tensor extension: `Inference-Header-Content-Length` says how long the JSON part is). They stay
out of /docs and the SDKs, which tritonclient and KServe's client replace. A model's routes carry
its policy's key, checked before the body is read, as on every route.
"""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from policy_server.http.errors import POLICY_ERRORS, oip_error_response
from policy_server.http.keys import key_in
from policy_server.oip.errors import OipError, bad_request, from_policy_error
from policy_server.oip.inference import InferParameters, InferRequest, InferResponse, RequestedOutput
from policy_server.oip.models import ModelMetadata, OipModel, OipModels, ServerMetadata
from policy_server.oip.tensors import Tensor, checked_datatype, checked_shape, from_bytes, from_values

HEADER_LENGTH = "inference-header-content-length"
Answer = tuple[int, bytes, dict[str, str]]  # status, body, headers (Content-Type included)
Handler = Callable[[Scope, bytes], Awaitable[Answer]]


class OipEndpoint:
    """An ASGI endpoint answering OIP's way: the key (when `model` has one) checked first, then
    the body read (at most `max_body_bytes`), then `handle`; every error `{"error": ...}`."""

    def __init__(self, handle: Handler, model: OipModel | None = None, *, reads_body: bool = False) -> None:
        self.handle = handle
        self.model = model
        self.reads_body = reads_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self._check_key(scope)
            body = await _read_body(scope, receive, scope["app"].state.body_guard.max_bytes) if self.reads_body else b""
            status, content, headers = await self.handle(scope, body)
        except POLICY_ERRORS as exc:
            response = oip_error_response(from_policy_error(exc))
        except OipError as exc:
            response = oip_error_response(exc)
        else:
            response = Response(content, status_code=status, headers=headers)
        await response(scope, receive, send)

    def _check_key(self, scope: Scope) -> None:
        check = self.model.key_check if self.model is not None else None
        if check is None:
            return
        refusal = check.refusal(key_in(Headers(scope=scope)))
        if refusal is not None:
            raise OipError(*refusal)


class OipRoute(Route):
    """A route that names itself in the scope, as FastAPI's routes do: the request metrics count
    it under its path. Out of the OpenAPI schema."""

    def __init__(self, path: str, endpoint: OipEndpoint, *methods: str) -> None:
        super().__init__(path, endpoint, methods=list(methods), include_in_schema=False)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def server_routes(is_ready: Callable[[], bool]) -> list[BaseRoute]:
    """`/v2` and the health routes: no key, they are what a load balancer probes."""

    async def metadata(scope: Scope, body: bytes) -> Answer:
        return _json(200, asdict(ServerMetadata()))

    async def live(scope: Scope, body: bytes) -> Answer:
        return _json(200, {"live": True})

    async def ready(scope: Scope, body: bytes) -> Answer:
        up = is_ready()
        return _json(200 if up else 503, {"ready": up})

    return [
        OipRoute("/v2", OipEndpoint(metadata), "GET"),
        OipRoute("/v2/health/live", OipEndpoint(live), "GET"),
        OipRoute("/v2/health/ready", OipEndpoint(ready), "GET"),
    ]


def unknown_model_routes(models: OipModels) -> list[BaseRoute]:
    """Last in the table: the answer for a model no policy serves (or a route no model has)."""

    async def unknown(scope: Scope, body: bytes) -> Answer:
        models.get(scope["path_params"]["name"])  # the 404 naming the models served
        raise OipError(404, f"No OIP route {scope['method']} {scope['path']}: see the README's OIP section for the routes.")

    endpoint = OipEndpoint(unknown)
    return [OipRoute(path, endpoint, "GET", "POST") for path in ("/v2/models/{name}", "/v2/models/{name}/{rest:path}")]


def model_routes(model: OipModel) -> list[BaseRoute]:
    """A model's metadata, readiness and infer, at `/v2/models/{name}` and under `/versions/{v}`."""

    def version_of(scope: Scope) -> str | None:
        return scope["path_params"].get("version")

    async def metadata(scope: Scope, body: bytes) -> Answer:
        return _json(200, _metadata_json(model.metadata(version_of(scope))))

    async def ready(scope: Scope, body: bytes) -> Answer:
        version = version_of(scope)
        model.metadata(version)  # a 404 for a version it does not have
        up = model.ready(version)
        return _json(200 if up else 503, {"name": model.name, "ready": up})

    async def infer(scope: Scope, body: bytes) -> Answer:
        request = parse_infer_request(Headers(scope=scope), body)
        response = await model.infer(request, version_of(scope))
        return _infer_answer(response, _binary_outputs(request, response))

    base = f"/v2/models/{model.name}"
    routes: list[BaseRoute] = []
    for prefix in (base, base + "/versions/{version}"):
        routes += [
            OipRoute(prefix, OipEndpoint(metadata, model), "GET"),
            OipRoute(prefix + "/ready", OipEndpoint(ready, model), "GET"),
            OipRoute(prefix + "/infer", OipEndpoint(infer, model, reads_body=True), "POST"),
        ]
    return routes


# --- requests ---------------------------------------------------------------------------------


def parse_infer_request(headers: Headers, body: bytes) -> InferRequest:
    """An infer body, JSON or JSON plus raw tensors (the binary extension), as an InferRequest.
    Its Content-Type is not read: tritonclient sends none, curl a form's, and OIP has one form."""
    json_part, binary_part = _split(body, headers.get(HEADER_LENGTH))
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as error:
        raise bad_request(f"the request is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise bad_request("the request must be a JSON object with 'inputs'")
    inputs = _listed(document, "inputs", required=True)
    parameters = _object(document.get("parameters"), "parameters")
    raw = _BinaryParts(binary_part)
    tensors = [_input_tensor(item, raw) for item in inputs]
    raw.check_all_read()
    outputs = document.get("outputs")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("'id' must be a string")
    return InferRequest(
        tensors,
        InferParameters.of(parameters),
        None if outputs is None else [_requested_output(item) for item in _listed(document, "outputs")],
        request_id,
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise bad_request(f"'Inference-Header-Content-Length: {header_length}' is not a length within the body of {len(body)} bytes")
    length = int(header_length)
    return body[:length], body[length:]


class _BinaryParts:
    """The raw tensor bytes after the JSON header, handed out in the order the inputs come."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, name: str, size: Any) -> bytes:
        if type(size) is not int or size < 0:
            raise bad_request(f"input '{name}': binary_data_size must be a non-negative integer")
        if self.offset + size > len(self.data):
            raise bad_request(f"input '{name}': binary_data_size {size} goes past the end of the body's tensor bytes")
        part = self.data[self.offset : self.offset + size]
        self.offset += size
        return bytes(part)

    def check_all_read(self) -> None:
        if self.offset != len(self.data):
            raise bad_request(f"{len(self.data) - self.offset} bytes after the tensors the inputs' binary_data_size account for")


def _input_tensor(item: Any, raw: _BinaryParts) -> Tensor:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise bad_request("each input must be an object with a 'name', 'shape', 'datatype' and 'data'")
    name = item["name"]
    shape = checked_shape(name, item.get("shape"))
    datatype = checked_datatype(name, item.get("datatype"))
    parameters = _object(item.get("parameters"), f"input '{name}' parameters")
    if "binary_data_size" in parameters:
        if "data" in item:
            raise bad_request(f"input '{name}': give 'data' or binary_data_size, not both")
        return from_bytes(name, datatype, shape, raw.take(name, parameters["binary_data_size"]))
    if "data" not in item:
        raise bad_request(f"input '{name}': no 'data' (nor binary_data_size)")
    return from_values(name, datatype, shape, item["data"])


def _requested_output(item: Any) -> RequestedOutput:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise bad_request("each requested output must be an object with a 'name'")
    parameters = _object(item.get("parameters"), f"output '{item['name']}' parameters")
    binary = parameters.get("binary_data")
    if binary is not None and type(binary) is not bool:
        raise bad_request(f"output '{item['name']}': binary_data must be true or false")
    return RequestedOutput(item["name"], binary)


def _listed(document: dict[str, Any], key: str, *, required: bool = False) -> list[Any]:
    value = document.get(key)
    if value is None and required:
        raise bad_request(f"the request has no '{key}'")
    if not isinstance(value, list):
        raise bad_request(f"'{key}' must be a list")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be an object")
    return value


# --- answers ----------------------------------------------------------------------------------


def _json(status: int, document: Any, headers: dict[str, str] | None = None) -> Answer:
    return status, orjson.dumps(document), {"content-type": "application/json", **(headers or {})}


def _metadata_json(metadata: ModelMetadata) -> dict[str, Any]:
    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": [_tensor_metadata(t.name, t.datatype, t.shape) for t in metadata.inputs],
        "outputs": [_tensor_metadata(t.name, t.datatype, t.shape) for t in metadata.outputs],
    }


def _tensor_metadata(name: str, datatype: str, shape: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def _binary_outputs(request: InferRequest, response: InferResponse) -> frozenset[str]:
    """The outputs sent as raw bytes: those whose `binary_data` says so, else as the request's
    `binary_data_output` says (for every output when it names none)."""
    default = request.parameters.binary_data_output
    if request.outputs is None:
        return frozenset(tensor.name for tensor in response.outputs) if default else frozenset()
    return frozenset(output.name for output in request.outputs if (default if output.binary is None else output.binary))


def _infer_answer(response: InferResponse, binary: frozenset[str]) -> Answer:
    """The answer's JSON, then the bytes of each output sent binary, in the outputs' order."""
    outputs = []
    blobs = []
    for tensor in response.outputs:
        entry = _tensor_metadata(tensor.name, tensor.datatype, tensor.shape)
        if tensor.name in binary:
            blob = tensor.to_bytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.to_list()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id is not None:
        document["id"] = response.id
    header = orjson.dumps(document)
    policy = {"x-policy-name": response.model_name, "x-policy-version": response.model_version}
    if not blobs:
        return 200, header, {"content-type": "application/json", **policy}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header)), **policy}
    return 200, b"".join([header, *blobs]), headers


async def _read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    declared = Headers(scope=scope).get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks = []
    received = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(max_bytes: int) -> OipError:
    return OipError(
        413, f"the body is over the limit of {max_bytes} bytes: send fewer observations per request, or raise POLICY_SERVER_MAX_BODY_BYTES"
    )
