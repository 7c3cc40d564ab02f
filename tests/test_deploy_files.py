"""The deployment files agree with the code and with each other. Docker and Kubernetes do not run
here, so what can be checked is checked: they parse, name the same image, ports and commands as
the code, the README and each other, and the Grafana dashboard queries metrics the app exports."""

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from policy_server import __version__
from policy_server.executors import ray as ray_executor
from policy_server.loading import load_policy_spec
from policy_server.metrics import Metrics
from policy_server.settings import DEFAULT_RAY_METRICS_PORT

REPO = Path(__file__).resolve().parents[1]
IMAGE = f"policy-server:{__version__}"
API_PORT = 8000  # the README's and the Dockerfile's `--port`


def _yaml(path: str) -> Any:
    return yaml.safe_load((REPO / path).read_text())


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name → its instructions (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, arguments = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            current = stages.setdefault(arguments.split(" AS ")[-1].strip(), [])
        current.append((keyword.upper(), arguments.strip()))
    return stages


def _instructions(stage: str, keyword: str) -> list[str]:
    return [arguments for kind, arguments in _dockerfile_stages()[stage] if kind == keyword]


def _cmd(stage: str) -> str:
    (cmd,) = _instructions(stage, "CMD")
    return shlex.join(json.loads(cmd))


def _requirement_pins(path: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / path).read_text().splitlines():
        name, separator, version = line.partition("==")
        if separator:
            pins[name.strip().lower()] = version.strip()
    return pins


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_builds_the_server_last_from_slim_python_with_java_as_a_user() -> None:
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "server"  # `docker build .` builds the server
    assert stages["base"][0] == ("FROM", "python:3.11-slim AS base")
    assert any("default-jre-headless" in arguments for kind, arguments in stages["base"] if kind == "RUN")
    for stage in stages:
        users = [arguments for kind, arguments in stages["base"] + stages[stage] if kind == "USER"]
        assert users[-1] not in ("root", "0"), stage


def test_dockerfile_copies_files_that_exist_and_ignores_the_venv() -> None:
    for arguments in _instructions("base", "COPY"):
        for source in arguments.split()[:-1]:
            assert (REPO / source).exists(), source
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and ".git/" in ignored


def test_dockerfile_serves_the_readme_command_on_the_code_ports() -> None:
    command = _cmd("server")
    assert command == f"python generate.py serve --host 0.0.0.0 --port {API_PORT}"
    assert command in (REPO / "README.md").read_text(), "the README shows the command the image runs"
    assert _instructions("server", "EXPOSE") == [f"{API_PORT} {DEFAULT_RAY_METRICS_PORT}"]
    (healthcheck,) = _instructions("server", "HEALTHCHECK")
    assert f"http://127.0.0.1:{API_PORT}/health" in healthcheck


def test_dockerfile_frontend_runs_streamlit_with_the_tested_pins() -> None:
    assert _cmd("frontend").startswith("streamlit run frontend.py --server.port 8501")
    (install,) = _instructions("frontend", "RUN")
    pins = _requirement_pins("requirements-dev.txt")
    for package in ("streamlit", "altair"):
        assert f"{package}=={pins[package]}" in install


# --- docker-compose.yml and prometheus.yml ------------------------------------------------------


def test_compose_runs_the_image_with_prometheus_grafana_and_the_frontend() -> None:
    services = _yaml("docker-compose.yml")["services"]
    assert set(services) == {"server", "frontend", "prometheus", "grafana"}
    server, frontend = services["server"], services["frontend"]
    assert server["image"] == IMAGE and server["build"] == {"context": ".", "target": "server"}
    assert "command" not in server  # the image's CMD, the README's command
    assert {f"{API_PORT}:{API_PORT}", f"{DEFAULT_RAY_METRICS_PORT}:{DEFAULT_RAY_METRICS_PORT}", "8501:8501"} <= set(server["ports"])
    assert frontend["build"]["target"] == "frontend" and frontend["network_mode"] == "service:server"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (REPO / source).exists(), source


def test_prometheus_scrapes_the_app_and_ray_on_their_ports() -> None:
    services = _yaml("docker-compose.yml")["services"]
    jobs = {job["job_name"]: job for job in _yaml("prometheus.yml")["scrape_configs"]}
    targets = {job: [t for c in config["static_configs"] for t in c["targets"]] for job, config in jobs.items()}
    assert targets == {"policy-server": [f"server:{API_PORT}"], "ray": [f"server:{DEFAULT_RAY_METRICS_PORT}"]}
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())
    assert all(target.split(":")[0] in services for job in targets.values() for target in job)
    mounted = [v for v in services["prometheus"]["volumes"] if v.startswith("./prometheus.yml:")]
    assert mounted == ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


# --- Grafana ------------------------------------------------------------------------------------


def _exported_names() -> set[str]:
    """Every series name the app's /metrics can show: counters' _total, histograms' parts, gauges."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


def _dashboard() -> dict[str, Any]:
    return json.loads((REPO / "deploy/grafana/dashboards/policy-server.json").read_text())


def test_grafana_queries_only_metrics_the_app_exports() -> None:
    expressions = [target["expr"] for panel in _dashboard()["panels"] for target in panel["targets"]]
    used = {name for expression in expressions for name in re.findall(r"policy_server_[a-z_]+", expression)}
    assert used and used <= _exported_names()
    joined = "\n".join(expressions)
    assert "rate(policy_server_requests_total" in joined  # request rate
    assert "histogram_quantile(0.99, sum by (le) (rate(policy_server_request_duration_seconds_bucket" in joined  # latency
    assert "policy_server_batch_size_bucket" in joined  # batch sizes
    assert "sum by (head, action) (rate(policy_server_actions_total" in joined  # action counts


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = _yaml("docker-compose.yml")["services"]
    (datasource,) = _yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    uids = {panel["datasource"]["uid"] for panel in _dashboard()["panels"]}
    assert uids == {datasource["uid"]}
    (provider,) = _yaml("deploy/grafana/provisioning/dashboards/policy-server.yml")["providers"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]


# --- KubeRay ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    document = _yaml("deploy/kuberay-rayservice.yaml")
    assert (document["apiVersion"], document["kind"]) == ("ray.io/v1", "RayService")
    return dict(document["spec"])


def _containers(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups = {"head": cluster["headGroupSpec"]} | {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def test_kuberay_runs_the_image_and_ray_this_code_uses(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    containers = _containers(cluster)
    assert {container["image"] for container in containers.values()} == {IMAGE}
    assert all({"containerPort": DEFAULT_RAY_METRICS_PORT, "name": "metrics"} in c["ports"] for c in containers.values())


def test_kuberay_head_runs_the_readme_command_and_probes_the_api(rayservice: dict[str, Any]) -> None:
    head = _containers(rayservice["rayClusterConfig"])["head"]
    assert head["args"][0].endswith(f"exec {_cmd('server')}")
    assert {"containerPort": API_PORT, "name": "api"} in head["ports"]
    assert head["readinessProbe"]["httpGet"] == {"path": "/ready", "port": API_PORT}
    assert head["livenessProbe"]["httpGet"] == {"path": "/health", "port": API_PORT}
    assert {"name": "RAY_ADDRESS", "value": "127.0.0.1:6379"} in head["env"]


def test_kuberay_has_a_cpu_and_a_gpu_worker_group(rayservice: dict[str, Any]) -> None:
    containers = _containers(rayservice["rayClusterConfig"])
    gpus = {name: c["resources"]["limits"].get("nvidia.com/gpu", 0) for name, c in containers.items() if name != "head"}
    assert gpus == {"cpu-workers": 0, "gpu-workers": 1}


def test_kuberay_serve_config_builds_the_images_default_policy(rayservice: dict[str, Any]) -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["serveConfigV2"]))
    (application,) = config.applications
    module, _, attribute = application.import_path.partition(":")
    assert module == ray_executor.__name__ and callable(getattr(ray_executor, attribute))
    # the image serves /app (POLICY_SERVER_DIR): this repository's schema.yaml and models/
    assert "POLICY_SERVER_DIR=/app" in _instructions("base", "ENV")[0].replace(" ", "")
    assert application.args == {"policy_dir": "/app"}
    assert application.name == load_policy_spec(REPO).name  # the API finds the application by this name
    assert application.route_prefix is None and config.http_options.port != API_PORT
