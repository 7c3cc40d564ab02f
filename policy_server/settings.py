"""Where the policy is and what the environment overrides: read once at start-up."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from policy_server.errors import ConfigError

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_QUEUE = 256  # requests waiting or running per policy; beyond, 503 (policy_server/admission.py)
DEFAULT_DRAIN_S = 20.0  # under Kubernetes' default 30 s grace period (policy_server/drain.py)
DEFAULT_REQUEST_TIMEOUT_S = 10.0  # a request's head and body must arrive within this (policy_server/protocol.py)
DEFAULT_RAY_METRICS_PORT = 8080
MAX_PORT = 65535
DEFAULT_WATCH_S = 2.0  # the repository is read again this often (policy_server/lifecycle.py)


@dataclass(frozen=True)
class Settings:
    """Everything the server takes from its environment rather than from schema.yaml."""

    policy_dir: Path
    api_key: str | None = field(default=None, repr=False)  # the key of policies whose schema.yaml names none
    admin_key: str | None = field(default=None, repr=False)  # opens the operator routes; None: they are closed
    default_policy: str | None = None  # the policy the root routes serve (None: the only one)
    watch_every_s: float | None = DEFAULT_WATCH_S  # how often the repository is read again; None: never
    auth_enabled: bool = True
    backend: str | None = None  # overrides serving.backend
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    drain_timeout_s: float = DEFAULT_DRAIN_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_connections: int | None = None  # None: the file-descriptor limit less a reserve
    torch_threads: int = 1
    inline_budget_ms: float = 1.0  # local: batches estimated cheaper than this run on the event loop
    metrics_enabled: bool = True
    sdk_cache_dir: Path = field(default_factory=lambda: _user_cache() / "clients")
    model_cache_dir: Path | None = field(default_factory=lambda: _user_cache() / "models")  # traces of .pt2 models
    sdks_in_background: bool = True  # False: generate the SDKs on the first /clients request
    experience_dir: Path | None = None  # logs every policy's decisions there (policy_server/experience/)
    grpc_port: int | None = None  # OIP over gRPC on this port (policy_server/oip/grpc/); None: no gRPC
    workers: int = 1  # API processes serving the same policies (generate.py serve --workers sets it)
    # backend ray (DESIGN.md §5)
    ray_address: str | None = None  # join this cluster instead of starting a local Ray; selects backend ray
    ray_node_ip: str | None = None  # this machine's address for Ray, whenever we start or join it
    ray_metrics_port: int = DEFAULT_RAY_METRICS_PORT  # Ray's own Prometheus metrics, of a Ray we start
    ray_cpus: int | None = None  # CPUs of a Ray we start (None: all of the machine's)
    ray_replica_cpus: float = 1.0  # CPUs reserved per replica

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        cache = Path(env["POLICY_SERVER_CACHE_DIR"]) if env.get("POLICY_SERVER_CACHE_DIR") else _user_cache()
        return cls(
            policy_dir=Path(env.get("POLICY_SERVER_DIR") or Path.cwd()),
            api_key=env.get("POLICY_SERVER_API_KEY") or None,
            admin_key=env.get("POLICY_SERVER_ADMIN_KEY") or None,
            default_policy=env.get("POLICY_SERVER_DEFAULT") or None,
            watch_every_s=_watch(env),
            auth_enabled=env.get("POLICY_SERVER_AUTH", "on").strip().lower() != "off",
            backend=env.get("POLICY_SERVER_BACKEND") or None,
            max_body_bytes=_positive_int(env, "POLICY_SERVER_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            max_queue=_positive_int(env, "POLICY_SERVER_MAX_QUEUE", DEFAULT_MAX_QUEUE),
            drain_timeout_s=_number(env, "POLICY_SERVER_DRAIN_SECONDS", DEFAULT_DRAIN_S, zero_allowed=True),
            request_timeout_s=_number(env, "POLICY_SERVER_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT_S),
            max_connections=_positive_int(env, "POLICY_SERVER_MAX_CONNECTIONS", 1) if env.get("POLICY_SERVER_MAX_CONNECTIONS") else None,
            torch_threads=_positive_int(env, "POLICY_SERVER_TORCH_THREADS", 1),
            inline_budget_ms=_number(env, "POLICY_SERVER_INLINE_MS", 1.0, zero_allowed=True),
            metrics_enabled=env.get("POLICY_SERVER_METRICS", "on").strip().lower() != "off",
            sdk_cache_dir=cache / "clients",
            model_cache_dir=cache / "models",
            sdks_in_background=env.get("POLICY_SERVER_SDKS", "background").strip().lower() != "on-request",
            experience_dir=Path(env["POLICY_SERVER_EXPERIENCE_DIR"]).resolve() if env.get("POLICY_SERVER_EXPERIENCE_DIR") else None,
            grpc_port=_port(env, "POLICY_SERVER_GRPC_PORT"),
            workers=_positive_int(env, "POLICY_SERVER_WORKERS", 1),
            ray_address=env.get("RAY_ADDRESS") or None,
            ray_node_ip=env.get("POLICY_SERVER_RAY_NODE_IP") or None,
            ray_metrics_port=_positive_int(env, "POLICY_SERVER_RAY_METRICS_PORT", DEFAULT_RAY_METRICS_PORT),
            ray_cpus=_positive_int(env, "POLICY_SERVER_RAY_CPUS", 2) if env.get("POLICY_SERVER_RAY_CPUS") else None,
            ray_replica_cpus=_number(env, "POLICY_SERVER_RAY_REPLICA_CPUS", 1.0),
        )


def _user_cache() -> Path:
    """Outside the policy folder, which may be read-only (a container image, a mounted volume)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "policy-server"


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError("environment", name, f"{raw!r} is not a positive whole number", f"set {name} to e.g. {default}")
    return int(raw)


def _port(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PORT:
        raise ConfigError("environment", name, f"{raw!r} is not a port number (1 to {MAX_PORT})", f"set {name} to e.g. 8001, or unset it")
    return int(raw)


def _number(env: Mapping[str, str], name: str, default: float, zero_allowed: bool = False) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 if zero_allowed else value > 0) or value == float("inf"):
        kind = "a number ≥ 0" if zero_allowed else "a positive number"
        raise ConfigError("environment", name, f"{raw!r} is not {kind}", f"set {name} to e.g. {default}")
    return value


def _watch(env: Mapping[str, str]) -> float | None:
    """POLICY_SERVER_WATCH: "off", or the seconds between two reads of the repository."""
    if env.get("POLICY_SERVER_WATCH", "").strip().lower() == "off":
        return None
    return _number(env, "POLICY_SERVER_WATCH", DEFAULT_WATCH_S)
