"""What every router of the app reads: the registry of policies and the server's own state."""

import time
from dataclasses import dataclass, field
from pathlib import Path

from policy_server.drain import Drain
from policy_server.experience.logs import ExperienceLogs
from policy_server.lifecycle import Registry


@dataclass(frozen=True)
class Limits:
    """What the HTTP layer bounds: body size, the drain after SIGTERM. (Queues: `Registry`.)"""

    max_body_bytes: int
    drain_timeout_s: float


@dataclass(frozen=True)
class SDKOptions:
    cache_dir: Path
    in_background: bool = True  # False: generate on the first request for them


@dataclass
class ServerContext:
    registry: Registry
    drain: Drain
    auth_on: bool
    sdks: SDKOptions | None
    admin_key: str | None = field(default=None, repr=False)
    experience: ExperienceLogs = field(default_factory=ExperienceLogs)
    started: float = field(default_factory=time.time)
