"""Prometheus metrics on the app's own /metrics (DESIGN.md §6).

One registry per app, so several apps in one process (tests) do not collide. With uvicorn
`--workers N`, set PROMETHEUS_MULTIPROC_DIR to an empty folder: prometheus_client then keeps
every worker's values in files there and /metrics sums them (`generate.py serve --workers N`
does this for you).
"""

import logging
import multiprocessing
import os
import time
from collections import Counter as Tally
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from policy_server.admission import Admission

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

logger = logging.getLogger("policy_server")

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
NOT_TRAFFIC = frozenset({"/metrics", "/health", "/ready"})  # scrapes and probes, not traffic
OTHER_ROUTE = "other"  # unknown paths share one label, so scanners cannot blow up the series count


class Metrics:
    """The server's metrics and their exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        registry = self.registry
        self.requests = Counter(
            "policy_server_requests", "HTTP requests answered, by route and status code.", ["route", "status"], registry=registry
        )
        self.request_duration = Histogram(
            "policy_server_request_duration_seconds",
            "Time from request to answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "policy_server_inference_duration_seconds",
            "One forward pass of the policy (a whole batch).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram("policy_server_batch_size", "Observations per forward pass.", buckets=BATCH_BUCKETS, registry=registry)
        self.actions = Counter(
            "policy_server_actions", "Actions the policy chose, by head and action label.", ["head", "action"], registry=registry
        )
        self.model_info = Gauge(
            "policy_server_model_info",
            "The model served (always 1).",
            ["name", "format", "backend", "device"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.shed = Counter(
            "policy_server_shed_requests", "Requests refused with 503 because the policy's queue was full.", registry=registry
        )
        self.queue_limit = Gauge(
            "policy_server_queue_limit", "Requests that may wait or run at once per policy.", registry=registry, multiprocess_mode="max"
        )
        self.queued = Gauge(
            "policy_server_queued_requests", "Requests waiting or running now.", registry=registry, multiprocess_mode="livesum"
        )
        self._action_counters: list[list[Any]] = []

    def warn_if_counts_split(self) -> None:
        """Under a uvicorn supervisor (--workers, --reload) each worker would count alone."""
        if multiprocessing.parent_process() is not None and not self.multiprocess:
            logger.warning(
                "this is a uvicorn worker process: with --workers > 1, set PROMETHEUS_MULTIPROC_DIR to an empty folder "
                "(or use 'python generate.py serve --workers N'), else /metrics shows one worker's counts"
            )

    def describe_model(self, info: dict[str, Any]) -> None:
        """Set model_info and bind one counter per discrete action (labels, else indices)."""
        self.model_info.labels(info["model"], info["format"], info["backend"], info["device"]).set(1)
        self._action_counters = [
            [self.actions.labels(head["name"], str(label)) for label in (head["labels"] or range(head["n"]))]
            for head in info["heads"]
            if head["kind"] == "discrete"
        ]

    def watch_queue(self, admission: "Admission") -> None:
        """Report the queue's bound, and its depth read at each scrape (nothing per request)."""
        self.queue_limit.set(admission.limit)
        if not self.multiprocess:  # a callback reads this process only: workers report their bound and sheds
            self.queued.set_function(lambda: admission.admitted)

    def count_shed(self) -> None:
        self.shed.inc()

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.inference_duration.observe(seconds)

    def count_actions(self, actions: Sequence[Sequence[Any]]) -> None:
        """Count the discrete actions of each row (continuous actions have no label to count)."""
        for head, counters in enumerate(self._action_counters):
            if len(actions) == 1:
                counters[actions[0][head]].inc()
            else:
                for action, count in Tally(row[head] for row in actions).items():
                    counters[action].inc(count)

    def exposition(self) -> tuple[bytes, str]:
        registry = self.registry
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """Pure ASGI middleware: counts and times every request but /metrics and /health.

    Sits inside CanonicalPath, so `/predict/` and `/api/v1/predict` count as `/predict`.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        # labels() builds and looks up a key under a lock on every call: keep the children
        self._counted: dict[tuple[str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in NOT_TRAFFIC:
            await self.app(scope, receive, send)
            return
        route = path if path in self.routes else OTHER_ROUTE
        status = 500  # what the client gets if the app fails before answering
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            elapsed = time.perf_counter() - started
            counter = self._counted.get((route, status))
            if counter is None:
                counter = self._counted[route, status] = self.metrics.requests.labels(route, str(status))
            timer = self._timed.get(route)
            if timer is None:
                timer = self._timed[route] = self.metrics.request_duration.labels(route)
            counter.inc()
            timer.observe(elapsed)
