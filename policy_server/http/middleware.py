"""What must hold of a request before it is routed (canonical paths) and before its body is read.

Pure ASGI rather than BaseHTTPMiddleware: they run on every request, and cost a function call.
"""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.http.errors import send_error


class CanonicalPath:
    """Serve every route with and without a trailing slash, and under `prefix`, without redirects.

    The original's clients POST to `/predict/`; a redirect would turn their POST into a failure in
    many HTTP clients. Rewriting the path here keeps one route (and one OpenAPI entry) per route.
    """

    def __init__(self, app: ASGIApp, prefix: str | None = None) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if self.prefix and (path == self.prefix or path.startswith(self.prefix + "/")):
                path = path[len(self.prefix) :] or "/"
            if len(path) > 1 and path.endswith("/"):
                path = path.rstrip("/") or "/"
            if path != scope["path"]:
                scope = dict(scope, path=path, raw_path=path.encode("latin-1"))
        await self.app(scope, receive, send)


class BodyGuard:
    """Bodies are JSON (415 otherwise; a missing Content-Type is taken as JSON) and at most
    `max_bytes`, declared or streamed (413 otherwise), each with a JSON `detail`.

    Run by the route (routes.py) after the key check: a client without the key learns nothing,
    not even that its body would have been refused."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    async def admit(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The receive to read the body with, or None once the request was answered 415 or 413."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        content_type, length = _content_headers(scope)
        if content_type is None:  # curl -d without -H, many embedded clients: read it as JSON
            scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
        elif not _is_json(content_type):
            await send_error(send, 415, "Send the body as JSON, with the header 'Content-Type: application/json'.")
            return None
        if length is not None and length > self.max_bytes:
            await send_error(send, 413, self._too_large())
            return None
        received = 0

        async def counting_receive() -> Message:
            # A body streamed without Content-Length: the route reading it gets the 413.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._too_large())
            return message

        return counting_receive

    def _too_large(self) -> str:
        return f"The body is over the limit of {self.max_bytes} bytes: send fewer observations per request, or raise POLICY_SERVER_MAX_BODY_BYTES."


def _content_headers(scope: Scope) -> tuple[str | None, int | None]:
    content_type = length = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            length = int(value) if value.isdigit() else None
    return content_type, length


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
