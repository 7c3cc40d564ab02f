"""Settings → registry of policies → executors → app: the composition `app.py` and `generate.py serve` share.

A user's mistake found here (bad schema, missing model, no api key) ends the process with one
line on stderr naming the file, the key and the fix: no traceback.
"""

import logging
import sys

from fastapi import FastAPI

from policy_server.errors import ConfigError
from policy_server.executors import Executor
from policy_server.executors.local import LocalExecutor
from policy_server.experience.logs import ExperienceLogs
from policy_server.lifecycle import ExecutorFactory, Registry
from policy_server.loading import ModelVersion, load_version
from policy_server.metrics import Metrics, PolicyMetrics
from policy_server.oip.grpc.options import GrpcOptions
from policy_server.schema import BACKENDS, PolicySpec
from policy_server.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    from policy_server.http.app import Limits, SDKOptions, create_app  # the HTTP layer sits on top; nothing below imports it

    metrics = Metrics() if settings.metrics_enabled else None
    registry = Registry(
        settings.policy_dir,
        executor_factory(settings),
        settings.max_queue,
        metrics,
        settings.default_policy,
        admit=lambda spec: admit_policy(spec, settings),
    )
    registry.load()
    return create_app(
        registry,
        auth_on=settings.auth_enabled,
        limits=Limits(settings.max_body_bytes, settings.drain_timeout_s),
        api_key=settings.api_key,
        admin_key=settings.admin_key,
        metrics=metrics,
        sdks=SDKOptions(settings.sdk_cache_dir, settings.sdks_in_background),
        watch_every_s=settings.watch_every_s,
        experience=ExperienceLogs(settings.experience_dir, shared=settings.workers > 1),
        grpc=grpc_options(settings),
    )


def grpc_options(settings: Settings) -> GrpcOptions | None:
    if settings.grpc_port is None:
        return None
    return GrpcOptions(settings.grpc_port, shared_port=settings.workers > 1, max_message_bytes=settings.max_body_bytes)


def admit_policy(spec: PolicySpec, settings: Settings) -> None:
    """Refuse, in one line, a schema these settings cannot serve."""
    require_api_key(spec, settings)
    refuse_recurrent_with_workers(spec, settings)


def refuse_recurrent_with_workers(spec: PolicySpec, settings: Settings) -> None:
    """A recurrent policy's episode states live in the API process (policy_server/recurrent/):
    with several, an episode's next step could land on one that holds none of its memory."""
    if spec.recurrent is not None and settings.workers > 1:
        raise ConfigError(
            spec.path,
            "recurrent",
            f"a recurrent policy keeps each episode's state in its API process, and {settings.workers} workers would split them",
            "serve it with one worker (generate.py serve without --workers; one API process: ray replicas scale the model)",
        )


def require_api_key(spec: PolicySpec, settings: Settings) -> None:
    if settings.auth_enabled and not (spec.api_key or settings.api_key):
        raise ConfigError(
            spec.path,
            "parameters.api_key",
            "no api key is configured",
            "set parameters.api_key or POLICY_SERVER_API_KEY (or POLICY_SERVER_AUTH=off to serve without auth)",
        )


def executor_factory(settings: Settings) -> ExecutorFactory:
    """Builds each policy's executor: `local` loads the model here (blocking), `ray` deploys on start."""

    def build(version: ModelVersion, metrics: PolicyMetrics | None) -> Executor:
        return create_executor(version, settings, metrics)

    return build


def create_executor(version: ModelVersion, settings: Settings, metrics: PolicyMetrics | None = None) -> Executor:
    observe_batch = metrics.observe_batch if metrics is not None else None
    spec = version.spec
    if choose_backend(spec, settings) == "ray":
        from policy_server.executors.ray import RayExecutor  # Ray takes seconds to import: only when asked for

        return RayExecutor(version, settings, observe_batch)
    policy = load_version(version, cache_dir=settings.model_cache_dir)
    return LocalExecutor(
        policy,
        spec.serving.max_batch_size,
        spec.serving.batch_wait_ms,
        settings.torch_threads,
        observe_batch,
        settings.inline_budget_ms,
        settings.model_cache_dir,
    )


def choose_backend(spec: PolicySpec, settings: Settings) -> str:
    """POLICY_SERVER_BACKEND, else ray if RAY_ADDRESS names a cluster to join, else the schema's."""
    backend = settings.backend or ("ray" if settings.ray_address else spec.serving.backend)
    if backend not in BACKENDS:
        raise ConfigError("environment", "POLICY_SERVER_BACKEND", f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    return backend


def app_from_environment() -> FastAPI:
    """For `uvicorn app:app`: the app, or exit 1 with one line if the policy cannot be served."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    try:
        return build_app(Settings.from_env())
    except ConfigError as error:
        print(f"policy-server: cannot start: {error}", file=sys.stderr)
        raise SystemExit(1) from None
