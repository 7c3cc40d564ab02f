"""`inference.GRPCInferenceService`: OIP over gRPC on the models the REST routes serve.

Each call is answered from the same `OipModels` the route table keeps in step with the
repository, so a hot reload reaches both transports at once, and from the same executors: a
gRPC request and a REST one waiting at the same moment share a forward pass. A model's calls
need its policy's key in the call's metadata (`access-token: KEY` or `authorization: Bearer
KEY`); the server's health and metadata need none, as on REST.
"""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
from starlette.datastructures import Headers

from policy_server.drain import Drain
from policy_server.http.keys import key_in
from policy_server.oip.errors import OipError
from policy_server.oip.grpc import inference_pb2 as pb
from policy_server.oip.grpc import inference_pb2_grpc as pb_grpc
from policy_server.oip.grpc.gathering import Gathering
from policy_server.oip.grpc.messages import infer_request, infer_response, model_metadata, server_metadata
from policy_server.oip.grpc.status import abort, code_of, oip_error_of
from policy_server.oip.grpc.stream import Answer, StreamSession
from policy_server.oip.models import OipModel, OipModels, ServerMetadata

Context = grpc.aio.ServicerContext
DRAINED = "the server is shutting down: every request this stream sent is answered; open a new stream"


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The OIP calls; `is_ready` is what REST's /v2/health/ready answers. Every call counts as a
    request in flight for the drain (a stream for as long as it is open)."""

    def __init__(self, models: OipModels, is_ready: Callable[[], bool], drain: Drain) -> None:
        self.models = models
        self.is_ready = is_ready
        self.drain = drain
        self.streams: set[StreamSession] = set()
        self.gathering = Gathering()

    def begin_drain(self) -> None:
        for stream in self.streams:
            stream.drain()

    # --- the server -------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return server_metadata(ServerMetadata())

    # --- a model ----------------------------------------------------------------------------

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        async with self._call(context):
            model = self._opened(request.name, context)
            version = request.version or None
            model.metadata(version)  # NOT_FOUND for a version it does not have
            return pb.ModelReadyResponse(ready=model.ready(version))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        async with self._call(context):
            return model_metadata(self._opened(request.name, context).metadata(request.version or None))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        async with self._call(context):
            return await self._infer(self._opened(request.model_name, context), request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        key = _key_of(context)

        async def answer(request: pb.ModelInferRequest) -> Answer:
            return await self._answer_in_stream(request, key)

        stream = StreamSession(answer, self._touched)
        self.streams.add(stream)
        try:
            async with self._call(context):
                async for response in stream.answers(request_iterator):
                    yield response
            if stream.drained:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(DRAINED)
        finally:
            self.streams.discard(stream)

    async def _answer_in_stream(self, request: pb.ModelInferRequest, key: str | None) -> Answer:
        """One message's answer: its decisions, or its error as `error_message` (the stream goes
        on); a key that does not open the model is the OipError that ends the stream."""
        try:
            model = self.models.get(request.model_name)
            refusal = _refusal(model, key)
            if refusal is not None:
                return refusal
            return pb.ModelStreamInferResponse(infer_response=await self._infer(model, request))
        except Exception as exc:
            error = oip_error_of(exc)
            named = f"request '{request.id}': " if request.id else ""
            failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
            return pb.ModelStreamInferResponse(
                error_message=f"{named}{error.message} ({code_of(error.status).name})", infer_response=failed
            )

    # --- every call -------------------------------------------------------------------------

    async def _infer(self, model: OipModel, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        parsed = infer_request(request)
        await self.gathering.arrived()  # with the requests arriving alongside: one batch
        return infer_response(await model.infer(parsed, request.model_version or None))

    def _opened(self, name: str, context: Context) -> OipModel:
        """The model `name`, if the call's key opens it."""
        model = self.models.get(name)
        refusal = _refusal(model, _key_of(context))
        if refusal is not None:
            raise refusal
        return model

    @asynccontextmanager
    async def _call(self, context: Context) -> AsyncIterator[None]:
        """A call in flight for the drain; an error raised in it ends it with its status (abort
        raises: no call falls through this without its answer)."""
        self.drain.in_flight += 1
        self._touched()
        try:
            yield
        except Exception as exc:
            await abort(context, oip_error_of(exc))
        finally:
            self.drain.in_flight -= 1

    def _touched(self) -> None:
        """A request arrived: during a drain, the server is not quiet yet."""
        if self.drain.draining:
            self.drain.last_request = time.monotonic()


def _key_of(context: Context) -> str | None:
    """The key the call sends, read as REST reads its headers."""
    metadata = context.invocation_metadata() or ()
    raw = [(key.encode("latin-1"), value.encode("latin-1", "replace")) for key, value in metadata if isinstance(value, str)]
    return key_in(Headers(raw=raw))


def _refusal(model: OipModel, key: str | None) -> OipError | None:
    check = model.key_check
    refusal = check.refusal(key) if check is not None else None
    return OipError(*refusal) if refusal is not None else None
