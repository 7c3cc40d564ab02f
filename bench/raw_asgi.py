"""The ceiling: a bare ASGI app that reads the body and answers a fixed decision. No framework,
no model: what Python HTTP on this machine can do at best."""

from typing import Any

ANSWER = b'{"actions":[0],"probability":1.0}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
