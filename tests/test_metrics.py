"""/metrics after known traffic: exact counts, histogram counts, labels; no key; workers summed."""

import random
import re
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, AUTH, MOUSE_OBSERVATION, MakePolicyDir, constant_logits
from fastapi.testclient import TestClient
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from servers import free_port, running_server, serve_command

from policy_server.metrics import LATENCY_BUCKETS, Observations

MASKED_SCHEMA = """\
parameters: {discrete: true, tuple: true, api_key: "1234567asdfgh"}
observations:
  x: {type: float}
  actionMask: {type: List[bool], min_items: 5, max_items: 5}
actions:
  - {name: machine, n: 2, labels: [a, b]}
  - {name: speed, n: 3, labels: [slow, normal, fast]}
"""


def sample_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples of `name` in the Prometheus text format whose labels include
    `labels` (as PromQL's sum over the other labels; 0 if none)."""
    wanted = labels or {}
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_:]+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in wanted.items()):
            total += float(match.group(3))
    return total


def test_counts_after_known_traffic(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> None:
    # Deterministic decisions: machine b (logit 5) and speed fast, unless the mask forbids them.
    folder = make_policy_dir(MASKED_SCHEMA, constant_logits(6, [0.0, 5.0, 0.0, 1.0, 5.0]), 6)
    client = serve(folder)
    everything = {"x": 0.0, "actionMask": [True, True, True, True, True]}
    no_fast = {"x": 0.0, "actionMask": [True, True, True, True, False]}
    for _ in range(3):
        assert client.post("/predict_deterministic", json=everything, headers=AUTH).status_code == 200
    assert client.post("/predict_deterministic/", json=no_fast, headers=AUTH).status_code == 200
    batch = client.post("/predict_batch?deterministic=true", json={"observations": [everything, no_fast]}, headers=AUTH)
    assert batch.status_code == 200
    assert client.post("/predict", json={"x": 1.0}, headers=AUTH).status_code == 422
    assert client.post("/predict", json=everything).status_code == 401
    for _ in range(4):
        client.get("/health")
        client.get("/ready")
        client.get("/metrics")
    client.get("/no-such-route")

    text = client.get("/metrics").text
    assert sample_value(text, "policy_server_requests_total", {"route": "/predict_deterministic", "status": "200"}) == 4
    assert sample_value(text, "policy_server_requests_total", {"route": "/predict_batch", "status": "200"}) == 1
    assert sample_value(text, "policy_server_requests_total", {"route": "/predict", "status": "422"}) == 1
    assert sample_value(text, "policy_server_requests_total", {"route": "/predict", "status": "401"}) == 1
    assert sample_value(text, "policy_server_requests_total", {"route": "other", "status": "404"}) == 1
    assert not any(f'route="{probe}"' in text for probe in ("/health", "/ready", "/metrics"))
    assert sample_value(text, "policy_server_request_duration_seconds_count", {"route": "/predict_deterministic"}) == 4
    # Forward passes: 4 single requests and one batch of 2 (the 422 and 401 never reach the model).
    assert sample_value(text, "policy_server_batch_size_count") == 5
    assert sample_value(text, "policy_server_batch_size_sum") == 6
    assert sample_value(text, "policy_server_inference_duration_seconds_count") == 5
    assert sample_value(text, "policy_server_actions_total", {"head": "machine", "action": "b"}) == 6
    assert sample_value(text, "policy_server_actions_total", {"head": "speed", "action": "fast"}) == 4
    assert sample_value(text, "policy_server_actions_total", {"head": "speed", "action": "normal"}) == 2
    assert sample_value(text, "policy_server_actions_total", {"head": "speed", "action": "slow"}) == 0
    info = {"name": "model.pt2", "format": "torch.export", "backend": "local", "device": "cpu"}
    assert sample_value(text, "policy_server_model_info", info) == 1
    assert API_KEY not in text


def test_metrics_off(serve: Callable[..., TestClient], mouse_dir: Path) -> None:
    client = serve(mouse_dir, metrics_enabled=False)
    assert client.post("/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 200
    assert client.get("/metrics").status_code == 404


def test_several_workers_are_summed(mouse_dir: Path, tmp_path: Path) -> None:
    """`generate.py serve --workers 2`: whichever worker answers /metrics, it counts both."""
    port = free_port()
    command = [*serve_command(mouse_dir, port), "--workers", "2"]
    shared = tmp_path / "prometheus"
    shared.mkdir()
    with running_server(command, port, cwd=mouse_dir, env={"PROMETHEUS_MULTIPROC_DIR": str(shared)}) as server:
        for _ in range(40):  # a new connection each time, so both workers take some
            assert httpx.post(f"{server.url}/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 200
        scrapes = [httpx.get(f"{server.url}/metrics").text for _ in range(8)]
    workers_that_counted = {path.stem.rsplit("_", 1)[-1] for path in shared.glob("counter_*.db")}
    assert len(workers_that_counted) == 2
    for text in scrapes:
        assert sample_value(text, "policy_server_requests_total", {"route": "/predict", "status": "200"}) == 40
        assert sample_value(text, "policy_server_batch_size_sum") == 40


def test_several_workers_metric_files_are_removed_at_the_stop(mouse_dir: Path, tmp_path: Path) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR, `--workers 2` makes the folder itself, and a SIGTERM leaves none behind."""
    port = free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with running_server([*serve_command(mouse_dir, port), "--workers", "2"], port, cwd=mouse_dir, env={"TMPDIR": str(scratch)}) as server:
        assert httpx.post(f"{server.url}/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 200
        (made,) = scratch.glob("policy-server-metrics-*")
        assert any(made.glob("*.db")), "the workers keep their metrics there"
    assert server.returncode == 0
    assert not list(scratch.glob("policy-server-metrics-*"))


def test_deferred_observations_expose_what_direct_ones_do() -> None:
    """Applied in bulk, counts and histogram buckets (values on the bounds too) come out as the
    same values observed one by one would, including values appended from another thread."""
    rng = random.Random(7)
    values = [*LATENCY_BUCKETS, 0.0, 10.0, *(rng.uniform(0.0002, 0.02) for _ in range(20_000))]
    exposed = []
    for deferred in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("latency_seconds", "t", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        counter = Counter("answers", "n", ["route"], registry=registry)
        observations = Observations(deferred=deferred, limit=8)
        children = histogram.labels("/predict"), counter.labels("/predict")
        other_thread = threading.Thread(target=lambda: [observations.add(children[1], 2) for _ in range(20_000)])  # noqa: B023
        other_thread.start()
        for value in values:
            observations.add(children[0], value)
            observations.add(children[1])
        other_thread.join()
        observations.apply()
        exposed.append(generate_latest(registry).decode())
    direct, deferred_text = exposed
    without_sum = [[line for line in text.splitlines() if "_sum" not in line] for text in exposed]
    assert without_sum[1] == without_sum[0]
    total = sample_value(direct, "latency_seconds_sum")
    assert sample_value(deferred_text, "latency_seconds_sum") == pytest.approx(total, rel=1e-12)  # summed in another order
    assert sample_value(direct, "answers_total") == len(values) + 40_000
    assert sample_value(direct, "latency_seconds_bucket", {"le": "0.0001"}) == 2  # 0.0 and 0.0001 itself


def test_fastapi_telemetry_follows_whether_opentelemetry_is_set_up(
    serve: Callable[..., TestClient], mouse_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tracer provider when the app is built: FastAPI's per-request OpenTelemetry checks are off.
    One set up (opentelemetry-instrument, say): they stay on, so its spans are not lost."""
    plain = serve(mouse_dir)
    assert not any(plain.app._telemetry[signal] for signal in ("tracing", "metrics", "logs"))  # type: ignore[attr-defined]
    assert plain.post("/predict", json=MOUSE_OBSERVATION, headers=AUTH).status_code == 200
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.NoOpTracerProvider())
    instrumented = serve(mouse_dir)
    assert instrumented.app._telemetry["tracing"]  # type: ignore[attr-defined]
