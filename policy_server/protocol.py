"""The HTTP/1.1 protocol `generate.py serve` runs: uvicorn's httptools protocol, hardened.

Three things uvicorn leaves to a proxy in front, which our users often do not have:

- **Stalled requests.** A connection that opens and sends nothing, headers dribbled a byte a
  second, or a body shorter than its Content-Length would hold a file descriptor for ever; a few
  hundred of them stop all service. Here every request must arrive whole (head and body) within
  `request_timeout_s` of its first byte (or of the connection's opening): else it is answered 408
  (if any of it came) and the connection closed, with one log line.
- **Too many connections.** Beyond `max_connections` (by default the file-descriptor limit less a
  reserve), a new connection is answered 503 and closed at once, so the process never runs out of
  descriptors for the connections it serves, its model files and its logs.
- **`Upgrade: h2c`.** httptools stops parsing at an `Upgrade` header, so a POST that asks to
  upgrade (Java's HttpClient, `curl --http2`) reached the app without its body. We do not upgrade
  to HTTP/2 in clear text; such a connection is handed, head and body, to uvicorn's h11
  protocol, which parses it whole and answers over HTTP/1.1, as RFC 9110 allows.

Use it with `generate.py serve`, or `uvicorn app:app --http policy_server.protocol:HardenedHTTP`.
"""

import asyncio
import functools
import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from policy_server.settings import Settings

logger = logging.getLogger("policy_server")

DESCRIPTOR_RESERVE = 64  # kept free for model files, logs, pipes, Ray's sockets
_REQUEST_INCOMPLETE = {h11.IDLE, h11.SEND_BODY}


@functools.cache
def _limits() -> tuple[float, int]:
    """(request timeout, max connections), read from the environment once per process."""
    settings = Settings.from_env()
    return settings.request_timeout_s, settings.max_connections or default_max_connections()


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - DESCRIPTOR_RESERVE)


def raise_descriptor_limit() -> None:
    """Raise the soft file-descriptor limit to the hard one: the first bound a busy server meets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Throttled:
    """At most one log line per second for a repeated event, saying how many it stands for."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = 0
        self.last = 0.0

    def __call__(self, *args: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= 1.0:
            suffix = f" ({self.count} since the last such line)" if self.count > 1 else ""
            logger.warning(self.message + suffix, *args)
            self.last, self.count = now, 0


_log_timeout = _Throttled("cut a connection from %s: its request did not arrive whole within %.0f s (%s)")
_log_refused = _Throttled("refused a connection from %s: %d connections are open, the limit (POLICY_SERVER_MAX_CONNECTIONS)")


class RequestDeadline:
    """One timer per connection: armed when a request starts, disarmed once it has arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, on_expiry: Callable[[], None]) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.on_expiry = on_expiry
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout_s, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        self.on_expiry()


def _raw_response(status: int, reason: str, detail: str, extra_headers: str = "") -> bytes:
    """A whole `{"detail"}` answer that closes the connection, for when no ASGI cycle can send one."""
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra_headers}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _cut_stalled(protocol: Any, deadline: RequestDeadline, started: bool) -> None:
    """Answer 408 if the request began and nothing was answered yet; then close the connection."""
    transport: asyncio.Transport = protocol.transport
    if transport is None or transport.is_closing():
        return
    cycle = protocol.cycle
    answered = cycle is not None and cycle.response_started and not cycle.response_complete
    reason = "nothing was sent" if not started else "the head was incomplete" if cycle is None else "the body was incomplete"
    _log_timeout(_peer(protocol), deadline.timeout_s, reason)
    if started and not answered:
        detail = f"The request did not arrive whole within {deadline.timeout_s:.0f} s: send the head and body without pausing."
        transport.write(_raw_response(408, "Request Timeout", detail))
    if cycle is not None and not cycle.response_complete:
        cycle.disconnected = True
        cycle.message_event.set()
    transport.close()


def _peer(protocol: Any) -> str:
    client = protocol.client
    return f"{client[0]}:{client[1]}" if client else "an unknown address"


class HardenedHTTP(HttpToolsProtocol):
    """httptools with a request deadline, a connection bound and h2c upgrade requests handed to h11."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timeout_s, self.max_connections = _limits()
        self.deadline = RequestDeadline(self.loop, timeout_s, self._on_deadline)
        self.request_started = False
        self.handing_over = False  # this request asks for an upgrade we do not make: h11 takes it
        self.head_start = b""  # that request's first line
        self.head_end = 0  # where, in the data being parsed, its head ends

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            _log_refused(_peer(self), len(self.connections) - 1)
            detail = "The server holds as many connections as it may: retry shortly."
            transport.write(_raw_response(503, "Service Unavailable", detail, "retry-after: 1\r\n"))
            transport.close()
            return
        self.deadline.arm()  # a connection that never sends is cut too

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.handing_over:
            self._hand_over_to_h11(data[self.head_end :])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.request_started = True
        self.deadline.arm()

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and not self._should_upgrade():
            self.handing_over = True  # no task for this request: h11 will parse it again, whole
            self.head_start = b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self.url, self.parser.get_http_version().encode())
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.handing_over:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.handing_over:
            return
        self.request_started = False
        self.deadline.disarm()
        super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn calls this in its `except HttpParserUpgrade:`, httptools' pause at the end of the
        head; the exception holds the offset, in the data fed, of what follows the head."""
        upgrade = sys.exception()
        self.head_end = int(upgrade.args[0]) if upgrade is not None and upgrade.args else 0

    def _on_deadline(self) -> None:
        _cut_stalled(self, self.deadline, self.request_started)

    def _hand_over_to_h11(self, rest: bytes) -> None:
        """Give the connection to h11 with this request's head rebuilt and whatever followed it."""
        self.deadline.disarm()
        self.connections.discard(self)
        head = [self.head_start]
        for name, value in self.headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        protocol = HardenedH11(config=self.config, server_state=self.server_state, app_state=self.app_state)
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        protocol.data_received(b"".join(head) + rest)


class HardenedH11(H11Protocol):
    """uvicorn's h11 protocol with the same request deadline (for connections that asked to upgrade)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timeout_s, _ = _limits()
        self.deadline = RequestDeadline(self.loop, timeout_s, self._on_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.disarm()
        super().connection_lost(exc)

    def _unsupported_upgrade_warning(self) -> None:
        """Answering over HTTP/1.1 is this protocol's purpose, not a condition to warn about."""

    def data_received(self, data: bytes) -> None:
        self.deadline.arm()
        super().data_received(data)
        if self.conn.their_state not in _REQUEST_INCOMPLETE or (self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]):
            self.deadline.disarm()

    def _on_deadline(self) -> None:
        _cut_stalled(self, self.deadline, started=True)
