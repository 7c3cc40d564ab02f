"""Settings → spec → executor → app: the composition `app.py` and `generate.py serve` share.

A user's mistake found here (bad schema, missing model, no api key) ends the process with one
line on stderr naming the file, the key and the fix: no traceback.
"""

import logging
import sys

from fastapi import FastAPI

from policy_server.errors import ConfigError
from policy_server.executors import Executor
from policy_server.executors.local import LocalExecutor
from policy_server.loading import ModelVersion, load_policy, load_policy_spec
from policy_server.metrics import Metrics
from policy_server.schema import BACKENDS, PolicySpec
from policy_server.settings import Settings


def build_app(settings: Settings) -> FastAPI:
    from policy_server.api import Limits, SDKOptions, create_app  # the HTTP layer sits on top; nothing below imports it

    spec = load_policy_spec(settings.policy_dir)
    api_key = _api_key(spec, settings)
    metrics = Metrics() if settings.metrics_enabled else None
    executor = create_executor(spec, settings, metrics)
    sdks = SDKOptions(settings.sdk_cache_dir, settings.sdks_in_background)
    limits = Limits(settings.max_body_bytes, settings.max_queue, settings.drain_timeout_s)
    return create_app(spec, executor, api_key=api_key, limits=limits, metrics=metrics, sdks=sdks)


def _api_key(spec: PolicySpec, settings: Settings) -> str | None:
    if not settings.auth_enabled:
        return None
    key = settings.api_key or spec.api_key
    if not key:
        raise ConfigError(
            spec.path,
            "parameters.api_key",
            "no api key is configured",
            "set parameters.api_key or POLICY_SERVER_API_KEY (or POLICY_SERVER_AUTH=off to serve without auth)",
        )
    return key


def create_executor(spec: PolicySpec, settings: Settings, metrics: Metrics | None = None) -> Executor:
    observe_batch = metrics.observe_batch if metrics is not None else None
    if choose_backend(spec, settings) == "ray":
        from policy_server.executors.ray import RayExecutor  # Ray takes seconds to import: only when asked for

        return RayExecutor(ModelVersion.of_folder(settings.policy_dir, spec), settings, observe_batch)
    policy = load_policy(settings.policy_dir, spec, cache_dir=settings.model_cache_dir)
    return LocalExecutor(
        policy, spec.serving.max_batch_size, spec.serving.batch_wait_ms, settings.torch_threads, observe_batch, settings.inline_budget_ms
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
