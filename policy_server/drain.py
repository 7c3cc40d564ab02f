"""SIGTERM drains instead of dropping: a stop loses no request that reached the server.

uvicorn's own SIGTERM handling stops listening and closes every idle keep-alive connection at
once, so a client that sends its next request on such a connection at that moment sees it reset.
Here SIGTERM starts a drain instead:

1. `/ready` answers 503 at once (load balancers stop sending new traffic), and the server stops
   accepting connections (a new one is refused, cleanly);
2. requests on the open connections are still answered, each with `Connection: close`, so every
   client's connection is closed by the server after an answer, never under a request;
3. once no connection is left open, or none has sent a request for `QUIET_S` (idle ones), or
   after `timeout_s` at most, uvicorn's own graceful shutdown runs: it answers what is in
   flight, closes what is idle, then the lifespan stops the executor.

SIGINT (Ctrl-C) skips the drain: a person at a terminal wants the server gone. The handler is
installed from the lifespan, i.e. after uvicorn installed its own (`Server.handle_exit`), which it
calls at the end; through that bound method it reaches uvicorn's listening sockets and open
connections. So this works under `uvicorn app:app` and `generate.py serve` alike.
"""

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("policy_server")

QUIET_S = 0.5  # a client in a loop sends again within this after its answer
_CLOSE = (b"connection", b"close")

SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class Drain:
    """The drain's state, shared by the middleware, /ready and the signal handler."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.in_flight = 0
        self.last_request = 0.0
        self.on_start: list[Callable[[], None]] = []  # told when a drain starts (the gRPC server)
        self._uvicorn_handler: SignalHandler = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Take over SIGTERM (from the lifespan, in the main thread; elsewhere nothing changes)."""
        self._loop = asyncio.get_running_loop()
        try:
            self._uvicorn_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (an embedding server, a test client): no drain
            self._loop = None

    def uninstall(self) -> None:
        if self._loop is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._uvicorn_handler)
        if self._task is not None:
            self._task.cancel()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.draining or self._loop is None:
            self._stop_server(signum, frame)  # a second SIGTERM: stop now
            return
        self.draining = True
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        logger.info("SIGTERM: draining (/ready is 503, new connections refused, answers close theirs), at most %.1f s", self.timeout_s)
        server = getattr(self._uvicorn_handler, "__self__", None)  # the uvicorn.Server, if it is one
        for listener in getattr(server, "servers", ()):
            listener.close()  # the open connections go on
        for started in self.on_start:
            started()
        state = getattr(server, "server_state", None)
        connections: set[Any] | None = getattr(state, "connections", None)
        self._task = asyncio.get_running_loop().create_task(self._wait_then_stop(connections))

    async def _wait_then_stop(self, connections: set[Any] | None) -> None:
        started = time.monotonic()
        self.last_request = max(self.last_request, started)
        while time.monotonic() - started < self.timeout_s:
            if self.in_flight == 0 and (connections == set() or time.monotonic() - self.last_request >= QUIET_S):
                break
            await asyncio.sleep(QUIET_S / 10)
        logger.info("drained in %.1f s: stopping", time.monotonic() - started)
        self._stop_server(signal.SIGTERM, None)

    def _stop_server(self, signum: int, frame: FrameType | None) -> None:
        handler = self._uvicorn_handler
        if callable(handler):
            handler(signum, frame)
        else:  # nobody else handles SIGTERM: end the way its default would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)


class DrainMiddleware:
    """Pure ASGI: counts requests in flight and, while draining, closes each connection after its answer."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        drain.in_flight += 1
        if drain.draining:
            drain.last_request = time.monotonic()
            send = _closing(send)
        try:
            await self.app(scope, receive, send)
        finally:
            drain.in_flight -= 1


def _closing(send: Send) -> Send:
    async def send_and_close(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [header for header in message.get("headers", []) if header[0].lower() != b"connection"]
            message = dict(message, headers=[*headers, _CLOSE])
        await send(message)

    return send_and_close
