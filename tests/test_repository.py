"""Several policies, versions, hot reload and rollback (DESIGN.md §10), on real servers and real files.

Each version of a test policy is a model of constant logits whose most likely action is its own
version number less one, so every answer shows which version computed it: the action must agree
with the answer's X-Policy-Version header.
"""

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import constant_logits, save_model
from servers import REPO, Server, free_port, run, running_server, serve_command
from test_metrics import sample_value

from policy_server.repository import scan

ADMIN_KEY = "operator-secret-1"
KEYS = {"alpha": "alpha-key-123", "beta": "beta-key-456"}
WATCH_S = "0.3"
SWITCH_TIMEOUT_S = 30.0
ACTIONS = 4  # versions 1..4 answer actions 0..3
OBSERVATION = {"x": 0.5}


def schema(name: str, key: str) -> str:
    return f"""\
name: {name}
parameters: {{discrete: true, api_key: "{key}"}}
observations:
  x: {{type: float, minimum: -1, maximum: 1}}
actions:
  - {{name: choice, n: {ACTIONS}}}
"""


def version_model(version: int) -> object:
    logits = [0.0] * ACTIONS
    logits[version - 1] = 8.0
    return constant_logits(1, logits)


def publish(policy: Path, version: int, staging: Path) -> None:
    """As the README says: write the version elsewhere, then rename it into models/ in one step."""
    built = staging / f"{policy.name}-{version}"
    save_model(version_model(version), built / "model.pt2", 1)  # type: ignore[arg-type]
    os.rename(built, policy / "models" / str(version))


def make_policy(root: Path, name: str, versions: list[int]) -> Path:
    folder = root / name
    (folder / "models").mkdir(parents=True)
    (folder / "schema.yaml").write_text(schema(name, KEYS.get(name, f"{name}-key")))
    for version in versions:
        save_model(version_model(version), folder / "models" / str(version) / "model.pt2", 1)  # type: ignore[arg-type]
    return folder


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "policies"
    make_policy(root, "alpha", [1])
    make_policy(root, "beta", [1, 2])
    return root


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    folder = tmp_path / "staging"
    folder.mkdir()
    return folder


def serving(root: Path, **env: str) -> "contextlib._GeneratorContextManager[Server]":
    port = free_port()
    settings = {"POLICY_SERVER_DEFAULT": "alpha", "POLICY_SERVER_WATCH": WATCH_S, "POLICY_SERVER_ADMIN_KEY": ADMIN_KEY} | env
    return running_server(serve_command(root, port), port, cwd=REPO, env=settings)


def key(name: str) -> dict[str, str]:
    return {"access-token": KEYS[name]}


ADMIN = {"access-token": ADMIN_KEY}


def decide(client: httpx.Client, path: str, headers: dict[str, str]) -> tuple[int, str, int]:
    """(status, X-Policy-Version, action) of a deterministic decision; the action says which version computed it."""
    response = client.post(path, json=OBSERVATION, headers=headers)
    if response.status_code != 200:
        return response.status_code, "", -1
    return 200, response.headers["x-policy-version"], response.json()["actions"][0]


def policies(client: httpx.Client) -> dict[str, dict]:
    return {entry["name"]: entry for entry in client.get("/policies").json()["policies"]}


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {SWITCH_TIMEOUT_S} s: {what}")


# --- two policies, their own keys --------------------------------------------------------------


def test_two_policies_each_opened_by_its_own_key_only(repository: Path) -> None:
    with serving(repository) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        listed = client.get("/policies").json()
        assert listed["default"] == "alpha"
        entries = {entry["name"]: entry for entry in listed["policies"]}
        assert set(entries) == {"alpha", "beta"}
        assert entries["beta"]["active"] == "2"  # the highest
        assert [(v["version"], v["state"]) for v in entries["beta"]["versions"]] == [("1", "available"), ("2", "ready")]
        assert len(entries["beta"]["versions"][1]["sha256"]) == 64

        assert decide(client, "/predict_deterministic/", key("alpha")) == (200, "1", 0)  # the root: the default policy
        assert decide(client, "/policies/beta/predict_deterministic", key("beta")) == (200, "2", 1)
        response = client.post("/policies/beta/predict", json=OBSERVATION, headers=key("beta"))
        assert response.headers["x-policy-name"] == "beta"
        assert set(response.json()) == {"actions", "probability"}  # bodies keep wave 1's keys

        routes = {
            "POST": ["predict", "predict_deterministic", "distribution", "predict_raw", "predict_batch"],
            "GET": ["schema", "info", "clients/python"],
        }
        for method, names in routes.items():
            for name in names:
                body = (
                    {"observations": [OBSERVATION]} if name == "predict_batch" else {"obs": [0.5]} if name == "predict_raw" else OBSERVATION
                )
                for policy, other in (("alpha", "beta"), ("beta", "alpha")):
                    path = f"/policies/{policy}/{name}"
                    kwargs = {"json": body} if method == "POST" else {}
                    assert client.request(method, path, headers=key(other), **kwargs).status_code == 403, (path, other)
                    assert client.request(method, path, **kwargs).status_code == 401, path
                    if name != "clients/python":  # generated on request: 503 here, covered by test_clients_http.py
                        assert client.request(method, path, headers=key(policy), **kwargs).status_code == 200, path
        assert client.post("/predict", json=OBSERVATION, headers=key("beta")).status_code == 403  # the root is alpha's

        assert client.get("/policies/beta/schema", headers=key("beta")).json()["name"] == "beta"
        info = client.get("/policies/beta/info", headers=key("beta")).json()
        assert (info["name"], info["policy_version"]) == ("beta", "2")
        spec = client.get("/openapi.json").json()
        operation_ids = [operation["operationId"] for item in spec["paths"].values() for operation in item.values()]
        assert len(operation_ids) == len(set(operation_ids))
        assert {"predict", "alpha_predict", "beta_predict", "beta_predict_batch"} <= set(operation_ids)
        assert spec["paths"]["/policies/beta/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/BetaObservation"
        }
        metrics = client.get("/metrics").text
    for secret in (*KEYS.values(), ADMIN_KEY):
        assert secret not in server.log
        assert secret not in metrics
    assert (
        sample_value(metrics, "policy_server_requests_total", {"route": "/policies/beta/predict", "policy": "beta", "version": "2"}) == 2
    )  # the call above, the one in the loop


# --- a version published under load -----------------------------------------------------------


def test_a_version_published_under_load_switches_with_no_failed_request(repository: Path, staging: Path) -> None:
    with serving(repository) as server:
        answers: list[list[tuple[int, str, int]]] = [[] for _ in range(6)]
        stop = threading.Event()

        def client_loop(seen: list[tuple[int, str, int]]) -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                deadline = time.monotonic() + 2 * SWITCH_TIMEOUT_S
                while not stop.is_set() and time.monotonic() < deadline:
                    seen.append(decide(client, "/predict_deterministic", key("alpha")))

        threads = [threading.Thread(target=client_loop, args=(seen,)) for seen in answers]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            publish(repository / "alpha", 2, staging)
            with httpx.Client(base_url=server.url, timeout=10) as client:
                wait_for(lambda: policies(client)["alpha"]["active"] == "2", "version 2 active")
            time.sleep(0.5)  # answers after the switch
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    every = [answer for seen in answers for answer in seen]
    assert {status for status, _, _ in every} == {200}
    assert all(action == int(version) - 1 for _, version, action in every)  # each answer is its version's
    for seen in answers:  # one client's requests are sequential: once it got version 2, never 1 again
        versions = [version for _, version, _ in seen]
        assert versions[0] == "1" and versions[-1] == "2"
        assert versions == sorted(versions)
    assert "version 2 is active" in server.log


# --- a broken version, the rollback ------------------------------------------------------------


def test_a_broken_version_never_serves_and_the_operator_rolls_back(repository: Path, staging: Path) -> None:
    beta = repository / "beta"
    with serving(repository) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        broken = staging / "3"
        broken.mkdir()
        (broken / "model.pt2").write_bytes(b"not a model at all")
        os.rename(broken, beta / "models" / "3")
        wait_for(lambda: policies(client)["beta"]["versions"][-1]["state"] == "failed", "version 3 failed")
        entry = policies(client)["beta"]
        assert entry["active"] == "2"
        assert "model.pt2" in entry["versions"][-1]["error"] and entry["error"] == entry["versions"][-1]["error"]
        assert decide(client, "/policies/beta/predict_deterministic", key("beta")) == (200, "2", 1)
        failures = client.get("/metrics").text
        assert sample_value(failures, "policy_server_version_failures_total", {"policy": "beta", "version": "3"}) == 1

        rollback = client.put("/policies/beta/active", json={"version": "1"}, headers=ADMIN)
        assert rollback.status_code == 200, rollback.text
        assert rollback.json()["active"] == "1"
        assert decide(client, "/policies/beta/predict_deterministic", key("beta")) == (200, "1", 0)
        time.sleep(3 * float(WATCH_S))
        assert policies(client)["beta"]["active"] == "1"  # the watcher keeps the operator's choice

        refused = client.put("/policies/beta/active", json={"version": "3"}, headers=ADMIN)
        assert refused.status_code == 409 and "model.pt2" in refused.json()["detail"]
        assert client.put("/policies/beta/active", json={"version": "9"}, headers=ADMIN).status_code == 404
        assert client.put("/policies/nope/active", json={"version": "1"}, headers=ADMIN).status_code == 404
        assert client.put("/policies/beta/active", json={"version": "two"}, headers=ADMIN).status_code == 422
        assert client.put("/policies/beta/active", json={"version": "2"}, headers=key("beta")).status_code == 403
        assert client.put("/policies/beta/active", json={"version": "2"}).status_code == 401
        assert decide(client, "/policies/beta/predict_deterministic", key("beta")) == (200, "1", 0)
    # one line from the watcher (which never tries unchanged files again), one for the operator's PUT
    assert server.log.count("version 3 cannot be served") == 2


def test_a_schema_that_cannot_be_read_leaves_the_loaded_version_serving(repository: Path) -> None:
    with serving(repository) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        (repository / "beta" / "schema.yaml").write_text("parameters: {discrete: maybe}\n")
        wait_for(lambda: (policies(client)["beta"]["error"] or "").startswith(str(repository / "beta")), "the error listed")
        time.sleep(3 * float(WATCH_S))
        assert set(policies(client)) == {"alpha", "beta"}
        assert "parameters.discrete" in policies(client)["beta"]["error"]
        assert decide(client, "/policies/beta/predict_deterministic", key("beta")) == (200, "2", 1)
    assert "retired" not in server.log


def test_the_operator_routes_are_closed_without_an_operator_key(repository: Path) -> None:
    with serving(repository, POLICY_SERVER_ADMIN_KEY="") as server, httpx.Client(base_url=server.url, timeout=10) as client:
        for response in (
            client.put("/policies/beta/active", json={"version": "1"}, headers=key("beta")),
            client.post("/policies/beta/reload", headers=ADMIN),
        ):
            assert response.status_code == 403
            assert "POLICY_SERVER_ADMIN_KEY" in response.json()["detail"]
        assert policies(client)["beta"]["active"] == "2"


def test_a_file_still_being_written_is_not_loaded(repository: Path, staging: Path) -> None:
    """A writer that ignores the README (writes in place, in pieces, slower than the watch) gets
    its version loaded once the file stops changing, and never a failed half of it."""
    save_model(version_model(3), staging / "model.pt2", 1)  # type: ignore[arg-type]
    whole = (staging / "model.pt2").read_bytes()
    target = repository / "alpha" / "models" / "3" / "model.pt2"
    target.parent.mkdir()
    with serving(repository) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        pieces = 12
        with target.open("wb") as file:
            for piece in range(pieces):
                file.write(whole[piece * len(whole) // pieces : (piece + 1) * len(whole) // pieces])
                file.flush()
                time.sleep(float(WATCH_S) / 2)  # two scans never see the same size
                assert policies(client)["alpha"]["active"] == "1"
        wait_for(lambda: policies(client)["alpha"]["active"] == "3", "version 3 active")
        assert decide(client, "/predict_deterministic", key("alpha")) == (200, "3", 2)
    assert "cannot be served" not in server.log


# --- policies come and go; reload on demand ----------------------------------------------------


def test_a_new_policy_folder_is_served_and_a_removed_one_retired_without_a_restart(repository: Path, staging: Path) -> None:
    with serving(repository) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        gamma = make_policy(staging, "gamma", [3])
        os.rename(gamma, repository / "gamma")
        wait_for(lambda: "gamma" in policies(client), "gamma served")
        assert decide(client, "/policies/gamma/predict_deterministic", {"access-token": "gamma-key"}) == (200, "3", 2)
        assert "/policies/gamma/predict" in client.get("/openapi.json").json()["paths"]

        os.rename(repository / "beta", staging / "beta-gone")
        wait_for(lambda: "beta" not in policies(client), "beta retired")
        assert client.post("/policies/beta/predict", json=OBSERVATION, headers=key("beta")).status_code == 404
        assert "/policies/beta/predict" not in client.get("/openapi.json").json()["paths"]
        assert decide(client, "/predict_deterministic", key("alpha")) == (200, "1", 0)
        wait_for(lambda: "policy beta: retired" in server.read_log(), "beta's executor stopped")


def test_with_the_watch_off_a_reload_asks_for_the_change(repository: Path, staging: Path) -> None:
    with serving(repository, POLICY_SERVER_WATCH="off") as server, httpx.Client(base_url=server.url, timeout=30) as client:
        publish(repository / "alpha", 2, staging)
        time.sleep(1.0)
        assert policies(client)["alpha"]["active"] == "1"
        reloaded = client.post("/policies/alpha/reload", headers=ADMIN)
        assert reloaded.status_code == 200 and reloaded.json()["active"] == "2"
        assert decide(client, "/predict_deterministic", key("alpha")) == (200, "2", 1)
        assert client.post("/policies/nope/reload", headers=ADMIN).status_code == 404


def test_a_pinned_version_is_served_and_a_changed_schema_changes_the_routes(repository: Path) -> None:
    beta = repository / "beta"
    (beta / "schema.yaml").write_text(schema("beta", KEYS["beta"]) + "serving: {version: 1}\n")
    with serving(repository) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert policies(client)["beta"]["active"] == "1"
        renamed = schema("beta", KEYS["beta"]).replace("  x: {type: float, minimum: -1, maximum: 1}", "  y: {type: float}")
        (beta / "schema.yaml").write_text(renamed)  # unpinned, and observation x is now y
        wait_for(lambda: policies(client)["beta"]["active"] == "2", "beta unpinned")
        answer = client.post("/policies/beta/predict_deterministic", json={"y": 0.1}, headers=key("beta"))
        assert answer.status_code == 200 and answer.headers["x-policy-version"] == "2"
        missing = client.post("/policies/beta/predict_deterministic", json={"x": 0.1}, headers=key("beta"))
        assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "y"]


def test_a_repository_without_a_default_serves_its_policies_under_their_names(repository: Path) -> None:
    with serving(repository, POLICY_SERVER_DEFAULT="") as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/policies").json()["default"] is None
        missing = client.post("/predict", json=OBSERVATION, headers=key("alpha"))
        assert missing.status_code == 404 and "/policies" in missing.json()["detail"]
        assert decide(client, "/policies/alpha/predict_deterministic", key("alpha")) == (200, "1", 0)


def test_an_unknown_default_is_a_one_line_start_up_error(repository: Path) -> None:
    result = run(serve_command(repository, free_port()), cwd=REPO, env={"POLICY_SERVER_DEFAULT": "gamma"})
    assert result.returncode == 1
    assert "policy-server: cannot start: environment: POLICY_SERVER_DEFAULT: no policy is named 'gamma'" in result.stderr
    assert "Traceback" not in result.stderr


# --- the scan alone: what counts as a policy and a version -------------------------------------


def test_the_scan_reads_versions_and_refuses_ambiguous_layouts(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    make_policy(root, "alpha", [1, 2])
    save_model(version_model(3), root / "alpha" / "models" / "10" / "model.pt2", 1)  # type: ignore[arg-type]
    make_policy(root, "beta", [])
    save_model(version_model(1), root / "beta" / "models" / "model.pt2", 1)  # type: ignore[arg-type]
    (root / "alpha" / "models" / "11").mkdir()  # being copied: no model file yet
    (root / "alpha" / "models" / "12.tmp").mkdir()  # not a number: not a version
    (root / ".staging").mkdir()
    (root / "notes").mkdir()  # no schema: not a policy
    snapshot = scan(root)
    assert not snapshot.single and set(snapshot.policies) == {"alpha", "beta"}
    alpha = snapshot.policies["alpha"]
    assert [version.label for version in alpha.versions] == ["1", "2", "10"]  # by number, not by text
    assert alpha.wanted is not None and alpha.wanted.label == "10"
    assert [version.label for version in snapshot.policies["beta"].versions] == ["1"]  # a bare file is version 1

    save_model(version_model(2), root / "alpha" / "models" / "2" / "other.pt", 1)  # type: ignore[arg-type]
    two = scan(root).policies["alpha"].version("2")
    assert two is not None and two.error is not None and "several model files" in str(two.error)

    (root / "beta" / "models" / "1").mkdir()
    save_model(version_model(1), root / "beta" / "models" / "1" / "model.pt2", 1)  # type: ignore[arg-type]
    beta = scan(root).policies["beta"]
    assert beta.error is not None and "beside numbered version folders" in str(beta.error)

    (root / "gamma").mkdir()
    (root / "gamma" / "schema.yaml").write_text(schema("alpha", "k"))  # the name of another policy
    clash = [source for source in scan(root).policies.values() if source.folder.name == "gamma"]
    assert clash[0].error is not None and "also the name of" in str(clash[0].error)


def test_one_policy_folder_is_a_repository_of_one(repository: Path) -> None:
    snapshot = scan(repository / "beta")
    assert snapshot.single and list(snapshot.policies) == ["beta"]
    pinned = repository / "beta" / "schema.yaml"
    pinned.write_text(schema("beta", "k") + "serving: {version: 1}\n")
    assert scan(repository / "beta").policies["beta"].wanted.label == "1"  # type: ignore[union-attr]


def test_oip_serves_every_policy_under_its_key_and_the_active_version(repository: Path) -> None:
    infer_body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}], "parameters": {"deterministic": True}}

    def oip_action(client: httpx.Client, path: str) -> tuple[int, Any]:
        answer = client.post(path, json=infer_body, headers=key("beta"))
        return answer.status_code, answer.json()

    with serving(repository) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/v2/models/alpha", headers=key("beta")).status_code == 403  # each model opens with its policy's key
        metadata = client.get("/v2/models/beta", headers=key("beta")).json()
        assert metadata["versions"] == ["1", "2"]
        status, answer = oip_action(client, "/v2/models/beta/infer")
        assert status == 200 and answer["model_version"] == "2" and answer["outputs"][0]["data"] == [1]  # version 2 answers action 1
        status, answer = oip_action(client, "/v2/models/beta/versions/1/infer")
        assert status == 400 and "version 2 is" in answer["error"] and "PUT /policies/beta/active" in answer["error"]
        assert client.get("/v2/models/beta/versions/1/ready", headers=key("beta")).json() == {"name": "beta", "ready": False}
        assert client.put("/policies/beta/active", json={"version": "1"}, headers=ADMIN).status_code == 200
        status, answer = oip_action(client, "/v2/models/beta/versions/1/infer")
        assert status == 200 and answer["model_version"] == "1" and answer["outputs"][0]["data"] == [0]
