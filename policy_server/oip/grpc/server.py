"""The gRPC server: started by the app's lifespan in uvicorn's event loop (grpc.aio), so its calls
reach the same executors as the HTTP routes, on `POLICY_SERVER_GRPC_PORT` at the host uvicorn
listens on.

With several uvicorn workers every worker binds the port (SO_REUSEPORT: the kernel spreads the
connections over them, as it does HTTP's); with one, the port is not shared, so a port already in
use is an error at start-up rather than a second server answering beside the first.

SIGTERM's drain stops accepting calls at once and lets the open ones finish (streams: until
quiet, stream.py) within the drain timeout; other stops (SIGINT) end the calls at once.
"""

import asyncio
import logging
import signal

import grpc

from policy_server.errors import ConfigError
from policy_server.oip.grpc import inference_pb2_grpc as pb_grpc
from policy_server.oip.grpc.options import GrpcOptions
from policy_server.oip.grpc.service import InferenceService

logger = logging.getLogger("policy_server")

DEFAULT_HOST = "127.0.0.1"  # uvicorn's default, when the app does not run under uvicorn's Server


class GrpcServer:
    def __init__(self, options: GrpcOptions, service: InferenceService, drain_timeout_s: float) -> None:
        self.options = options
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self, host: str) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", int(self.options.shared_port)),
                ("grpc.max_receive_message_length", self.options.max_message_bytes),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, server)
        address = f"[{host}]:{self.options.port}" if ":" in host else f"{host}:{self.options.port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(
                "environment", "POLICY_SERVER_GRPC_PORT", f"cannot listen on {address}", "choose a port nothing else listens on"
            )
        await server.start()
        self._server = server
        logger.info("OIP over gRPC on %s%s", address, " (port shared by the workers)" if self.options.shared_port else "")

    def begin_drain(self) -> None:
        """New calls refused from now on; the open ones finish within the drain timeout."""
        if self._server is None or self._stopping is not None:
            return
        self.service.begin_drain()
        self._stopping = asyncio.get_running_loop().create_task(self._server.stop(self.drain_timeout_s))

    async def stop(self) -> None:
        """After a drain: once its calls are done; else now, ending the calls still open."""
        if self._stopping is not None:
            await self._stopping
        elif self._server is not None:
            await self._server.stop(0)


def uvicorn_host() -> str:
    """The host uvicorn listens on. The app is not told it, but uvicorn's `Server` installs its
    SIGTERM handler before the lifespan starts, and that bound method knows its config. Read it
    before the drain takes SIGTERM over."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    host = getattr(getattr(server, "config", None), "host", None)
    return host if isinstance(host, str) and host else DEFAULT_HOST
