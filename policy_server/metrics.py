"""Prometheus metrics on the app's own /metrics (DESIGN.md §6).

One registry per app, so several apps in one process (tests) do not collide. With uvicorn
`--workers N`, set PROMETHEUS_MULTIPROC_DIR to an empty folder: prometheus_client then keeps
every worker's values in files there and /metrics sums them (`generate.py serve --workers N`
does this for you).
"""

import logging
import multiprocessing
import os
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
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
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from policy_server.admission import Admission
    from policy_server.policy import Decisions
    from policy_server.recurrent.states import EpisodeStates

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

logger = logging.getLogger("policy_server")

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
NOT_TRAFFIC = frozenset({"/metrics", "/health", "/ready"})  # scrapes and probes, not traffic
OTHER_ROUTE = "other"  # unknown paths share one label, so scanners cannot blow up the series count
POLICY_HEADER = b"x-policy-name"  # which policy and version answered a prediction (set by the routes)
VERSION_HEADER = b"x-policy-version"


Series = Counter | Histogram  # a child: one label set's series


class Observations:
    """The hot path's counts and observations, applied to their series in bulk.

    prometheus_client takes a lock per value it changes and walks a histogram's buckets in Python:
    several microseconds per request, a share of a one-row /predict that shows at high request
    rates (bench/RESULTS.md, `local-no-metrics`). Here a request appends (series, value) to a
    queue, and `apply` (before each scrape, and whenever the queue holds `limit`) adds each
    series' total once and sorts a histogram's values into its buckets with numpy.

    `deferred=False` applies each at once: with PROMETHEUS_MULTIPROC_DIR, every worker's values
    are in shared files, and a scrape answered by one worker cannot apply another's queue.
    A deque, because forward passes on the worker thread observe too: its append and popleft
    are atomic.
    """

    def __init__(self, deferred: bool, limit: int = 4096) -> None:
        self.deferred = deferred
        self.limit = limit
        self._queue: deque[tuple[Series, float]] = deque()
        self._applying = threading.Lock()  # the worker thread may fill the queue up while a scrape applies it

    def add(self, series: Series, value: float = 1.0) -> None:
        """Count `value` (a Counter) or observe it (a Histogram)."""
        if not self.deferred:
            _apply_one(series, value)
            return
        self._queue.append((series, value))
        if len(self._queue) >= self.limit:
            self.apply()

    def apply(self) -> None:
        with self._applying:
            self._apply()

    def _apply(self) -> None:
        queue = self._queue
        values_of: dict[int, tuple[Series, list[float]]] = {}
        for _ in range(len(queue)):  # what others append meanwhile waits for the next apply
            series, value = queue.popleft()
            values_of.setdefault(id(series), (series, []))[1].append(value)
        for series, values in values_of.values():
            if isinstance(series, Histogram):
                _observe_all(series, values)
            else:
                series.inc(sum(values))


def _apply_one(series: Series, value: float) -> None:
    if isinstance(series, Histogram):
        series.observe(value)
    else:
        series.inc(value)


def _observe_all(histogram: Histogram, values: list[float]) -> None:
    """As `observe` for each value: a value goes to the first bucket whose bound is at least it.
    (prometheus_client keeps per-bucket counts, summed into cumulative ones at exposition.)"""
    bounds = histogram._upper_bounds  # private: a histogram has no public bulk update
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(np.sum(values)))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)


class Metrics:
    """The server's metrics and their exposition; `for_policy` gives one policy's view of them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.observations = Observations(deferred=not self.multiprocess)
        self._collectors: list[Collector] = []
        registry = self.registry
        self.requests = Counter(
            "policy_server_requests",
            "HTTP requests answered, by route, status code, and the policy and version that answered (empty: none did).",
            ["route", "status", "policy", "version"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "policy_server_request_duration_seconds",
            "Time from request to answer, by route and policy.",
            ["route", "policy"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "policy_server_inference_duration_seconds",
            "One forward pass of the policy (a whole batch).",
            ["policy"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "policy_server_batch_size", "Observations per forward pass.", ["policy"], buckets=BATCH_BUCKETS, registry=registry
        )
        self.actions = Counter(
            "policy_server_actions",
            "Actions the policy chose, by version, head and action label.",
            ["policy", "version", "head", "action"],
            registry=registry,
        )
        self.model_info = Gauge(
            "policy_server_model_info",
            "The model of each policy's active version (always 1).",
            ["policy", "version", "name", "format", "backend", "device"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.version_failures = Counter(
            "policy_server_version_failures",
            "Versions that failed to load or to pass their checks (the old version served on): /policies says why.",
            ["policy", "version"],
            registry=registry,
        )
        self.shed = Counter(
            "policy_server_shed_requests", "Requests refused with 503 because the policy's queue was full.", ["policy"], registry=registry
        )
        self.queue_limit = Gauge(
            "policy_server_queue_limit",
            "Requests that may wait or run at once per policy.",
            ["policy"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.queued = Gauge(
            "policy_server_queued_requests", "Requests waiting or running now.", ["policy"], registry=registry, multiprocess_mode="livesum"
        )
        # A recurrent policy's episode store, read at each scrape (one API process: DESIGN.md §13).
        self.episodes = {
            name: Gauge(f"policy_server_recurrent_{name}", doc, ["policy"], registry=registry, multiprocess_mode="livesum")
            for name, doc in (
                ("episodes", "Episodes whose state a recurrent policy holds now."),
                ("state_bytes", "Bytes of the state values those episodes hold."),
                ("evicted_episodes", "Episodes forgotten because more than recurrent.max_episodes were held (since start)."),
                ("expired_episodes", "Episodes forgotten after recurrent.idle_expiry_seconds idle (since start)."),
            )
        }

    def warn_if_counts_split(self) -> None:
        """Under a uvicorn supervisor (--workers, --reload) each worker would count alone."""
        if multiprocessing.parent_process() is not None and not self.multiprocess:
            logger.warning(
                "this is a uvicorn worker process: with --workers > 1, set PROMETHEUS_MULTIPROC_DIR to an empty folder "
                "(or use 'python generate.py serve --workers N'), else /metrics shows one worker's counts"
            )

    def add_collector(self, collector: Collector) -> None:
        """Series read at each scrape from this process's state (with several workers: the one scraped)."""
        self.registry.register(collector)
        self._collectors.append(collector)

    def for_policy(self, name: str) -> "PolicyMetrics":
        return PolicyMetrics(self, name)

    def exposition(self) -> tuple[bytes, str]:
        self.observations.apply()
        registry = self.registry
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            for collector in self._collectors:
                registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class PolicyMetrics:
    """One policy's series, their children bound once (labels() costs a lock and a lookup per call)."""

    def __init__(self, metrics: Metrics, policy: str) -> None:
        self.metrics = metrics
        self.policy = policy
        self._batch_size = metrics.batch_size.labels(policy)
        self._inference = metrics.inference_duration.labels(policy)
        self._shed = metrics.shed.labels(policy)
        self._action_counters: dict[str, list[list[Any]]] = {}  # version → per discrete head, per action
        self._model_labels: tuple[str, ...] | None = None

    def describe_model(self, info: dict[str, Any]) -> None:
        """The active version's model_info, and one counter per discrete action (labels, else indices)."""
        version = str(info.get("version", "1"))
        labels = (self.policy, version, str(info.get("model")), str(info.get("format")), str(info.get("backend")), str(info.get("device")))
        if self._model_labels is not None and self._model_labels != labels:
            self.metrics.model_info.remove(*self._model_labels)
        self.metrics.model_info.labels(*labels).set(1)
        self._model_labels = labels
        self._action_counters[version] = [
            [self.metrics.actions.labels(self.policy, version, head["name"], str(label)) for label in (head["labels"] or range(head["n"]))]
            for head in info.get("heads") or []
            if head["kind"] == "discrete"
        ]

    def watch_queue(self, admission: "Admission") -> None:
        """Report the queue's bound, and its depth read at each scrape (nothing per request)."""
        self.metrics.queue_limit.labels(self.policy).set(admission.limit)
        if not self.metrics.multiprocess:  # a callback reads this process only: workers report their bound and sheds
            self.metrics.queued.labels(self.policy).set_function(lambda: admission.admitted)

    def watch_episodes(self, store: "EpisodeStates") -> None:
        """A recurrent policy's episodes held, their state's bytes, and those evicted and expired."""
        readings = {"episodes": store.__len__, "state_bytes": lambda: store.state_bytes}
        readings |= {"evicted_episodes": lambda: store.evicted, "expired_episodes": lambda: store.expired}
        for name, read in readings.items():
            self.metrics.episodes[name].labels(self.policy).set_function(read)

    def count_failed_version(self, version: str) -> None:
        self.metrics.version_failures.labels(self.policy, version).inc()

    def count_shed(self) -> None:
        self._shed.inc()

    def observe_batch(self, rows: int, seconds: float) -> None:
        observations = self.metrics.observations
        observations.add(self._batch_size, rows)
        observations.add(self._inference, seconds)

    def count_actions(self, decisions: "Decisions") -> None:
        """Count the discrete actions of each row (continuous actions have no label to count):
        a batch's with one bincount per head, not a Python step per row."""
        observations = self.metrics.observations
        heads = self._action_counters.get(decisions.version, ())
        values = decisions.action_values
        actions = decisions.actions
        if len(actions) == 1:
            for head, counters in enumerate(heads):
                observations.add(counters[actions[0][head]])
        elif values is None:
            for head, counters in enumerate(heads):
                for action, count in Tally(map(itemgetter(head), actions)).items():
                    observations.add(counters[action], count)
        else:
            self._count_columns(heads, values)

    def _count_columns(self, heads: Sequence[list[Any]], values: np.ndarray) -> None:
        observations = self.metrics.observations
        for head, counters in enumerate(heads):
            counts = np.bincount(values[:, head].astype(np.intp), minlength=len(counters))
            for action in np.flatnonzero(counts):
                observations.add(counters[action], int(counts[action]))


class RequestMetrics:
    """Pure ASGI middleware: counts and times every request but /metrics and /health.

    Sits inside CanonicalPath, so `/predict/` and `/api/v1/predict` count as `/predict`. The route
    is the one that matched (its path; `other` for none); the policy and version are those the
    answer names in its X-Policy-Name and X-Policy-Version headers.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # labels() builds and looks up a key under a lock on every call: keep the children
        self._counted: dict[tuple[str, int, bytes, bytes], Any] = {}
        self._timed: dict[tuple[str, bytes], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in NOT_TRAFFIC:
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before answering
        policy = version = b""
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status, policy, version
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == POLICY_HEADER:
                        policy = value
                    elif name == VERSION_HEADER:
                        version = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            elapsed = time.perf_counter() - started
            matched = scope.get("route")
            route = getattr(matched, "path", OTHER_ROUTE)
            counter = self._counted.get((route, status, policy, version))
            if counter is None:
                labels = (route, str(status), policy.decode("latin-1"), version.decode("latin-1"))
                counter = self._counted[route, status, policy, version] = self.metrics.requests.labels(*labels)
            timer = self._timed.get((route, policy))
            if timer is None:
                timer = self._timed[route, policy] = self.metrics.request_duration.labels(route, policy.decode("latin-1"))
            observations = self.metrics.observations
            observations.add(counter)
            observations.add(timer, elapsed)
