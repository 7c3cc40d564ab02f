"""The api keys never leave the server: every log line and every echoed text is redacted.

A client may put the key where it does not belong (`?api_key=KEY`, a path segment, a body), and
whatever then quotes the request (uvicorn's access log, a 404's detail, a traceback, uvicorn's
`--log-level trace` dump of the headers) would carry it. So the keys are registered here once, and:

- `redact(text)` replaces each key, as sent or percent-encoded, with `***`;
- `install_log_redaction()` wraps the logging module's record factory, so every record made in
  this process, by any logger at any level, is redacted when it is made: before any handler or
  formatter (uvicorn's included, whatever `--log-level` or `--access-log` says) sees it.
"""

import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

MASK = "***"

_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def register_secret(secret: str) -> None:
    """From now on, `secret` is redacted everywhere (idempotent)."""
    with _lock:
        _secrets.add(secret)
    install_log_redaction()


def redact(text: str) -> str:
    """`text` without any registered secret, whether it holds the secret as is or percent-encoded."""
    if not _secrets:
        return text
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if "%" in text or "+" in text:
        decoded = unquote_plus(text)
        if any(secret in decoded for secret in _secrets):
            return redact(decoded)
    return text


def install_log_redaction() -> None:
    """Redact every log record made in this process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        logging.setLogRecordFactory(_redacting(logging.getLogRecordFactory()))


def _redacting(make_record: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make_redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _secrets:
            _redact_record(record)
        return record

    return make_redacted_record


def _redact_record(record: logging.LogRecord) -> None:
    """Redact the arguments one by one where they are strings (uvicorn's access formatter unpacks
    them), then the message as a whole if a secret still shows (a dict or bytes argument)."""
    if isinstance(record.args, tuple):
        record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    message = record.getMessage()
    if redact(message) != message:
        record.msg, record.args = redact(message), None
    if record.exc_info:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
