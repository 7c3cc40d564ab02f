"""Property-based API tests: schemathesis fuzzes real servers from their own OpenAPI spec.

`schemathesis run --checks all` against `uvicorn app:app` on 127.0.0.1, the api key sent: every
check (no 5xx, status codes, content types, headers and bodies as documented, schema-valid
requests accepted, schema-violating ones refused, the key not ignored, ...), the examples phase,
the coverage phase (every boundary and wrong type of every field) and random fuzzing, run
deterministically. Served: the three examples (examples/), a policy with every observation type and
unbounded values, and one without observations (/predict_raw only).

FUZZ_MAX_EXAMPLES sets the fuzzed cases per operation: a few here, the full count in `make fuzz`.
"""

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from conftest import API_KEY, AUTH, MOUSE_SCHEMA, MakePolicyDir, TupleOutputs, mlp
from fastapi.testclient import TestClient
from servers import REPO, free_port, running_server, uvicorn_command

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "5"))
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
FUZZ_TIMEOUT_S = 1800.0
EXAMPLES = ("mouse_and_cheese", "tuple_masking", "pendulum")

EVERY_TYPE_SCHEMA = """\
parameters:
  discrete: true
  tuple: true
  api_key: "1234567asdfgh"
observations:
  actionMask: {type: List[bool], min_items: 5, max_items: 5, description: "allowed actions of both heads"}
  features: {type: List[float], min_items: 3, max_items: 3}
  step: {type: int, minimum: 0, maximum: 1000}
  flags: {type: List[int], min_items: 2, max_items: 2}
  velocity: {type: float}
  ready: {type: bool}
actions:
  - {name: move, n: 2, labels: [left, right]}
  - {name: speed, n: 3}
"""
EVERY_TYPE_INPUT_SIZE = 13

EVERY_TYPE_REST = {"features": [0.5, -1.0, 2.0], "step": 3, "flags": [1, -2], "velocity": 0.25, "ready": True}
EVERY_TYPE_REST_ROW = [0.5, -1.0, 2.0, 3.0, 1.0, -2.0, 0.25, 1.0]  # the same, as the raw vector's end


@dataclass(frozen=True)
class FuzzRun:
    """What one `schemathesis run` found, from its JSON report."""

    cases: int
    failures: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    seconds: float
    exit_code: int
    output: str  # the CLI's own report: each failure with a curl line that reproduces it


def fuzz(url: str, report_dir: Path) -> FuzzRun:
    """Every root operation but the SDK downloads and the operator's: /clients answers 503 by design while Java generates
    the SDKs (documented; tests/test_clients_http.py covers both routes), and a fuzzed call would
    start that generation. The key goes in every request; the `ignored_auth` check drops it."""
    report = report_dir / "schemathesis.json"
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{url}/openapi.json",
        "--checks=all",
        f"--header=access-token: {API_KEY}",
        f"--max-examples={MAX_EXAMPLES}",
        "--generation-deterministic",
        "--workers=1",  # schemathesis 4.32.5's coverage phase fails on a KeyError with several workers
        # /clients*; the operator routes (tests/test_repository.py); and each policy's routes under
        # /policies/{name}/, built by the same code as the root's
        "--exclude-path-regex=^/(clients|policies/)",
        "--report=json",
        f"--report-json-path={report}",
        "--no-color",
    ]
    finished = subprocess.run(command, cwd=report_dir, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S, check=False)
    summary = json.loads(report.read_text())
    return FuzzRun(
        cases=summary["test_cases"]["generated"],
        failures=summary["failures"],
        errors=summary["errors"],
        seconds=summary["running_time"],
        exit_code=finished.returncode,
        output=finished.stdout + finished.stderr,
    )


def fuzz_server(folder: Path, report_dir: Path, name: str, env: dict[str, str] | None = None) -> FuzzRun:
    port = free_port()
    with running_server(uvicorn_command(port), port, cwd=folder, env=env) as server:
        run = fuzz(server.url, report_dir)
    print(f"\nfuzz {name}: {run.cases} cases, {len(run.failures)} failures, {len(run.errors)} errors, {run.seconds:.1f} s")
    assert "Traceback" not in server.log, server.log
    assert run.failures == [] and run.errors == [] and run.exit_code == 0, run.output
    return run


@pytest.mark.parametrize("example", EXAMPLES)
def test_fuzz_an_example(example: str, tmp_path: Path) -> None:
    run = fuzz_server(REPO / "examples" / example, tmp_path, example)
    assert run.cases >= 100, run.output


def test_fuzz_an_example_that_logs_experience(tmp_path: Path) -> None:
    """Episodes named in the query and per observation, outcomes and /collect_experience: every
    schema-valid request accepted (an outcome of no episode: the documented 404)."""
    run = fuzz_server(REPO / "examples" / "mouse_and_cheese", tmp_path, "logging", {"POLICY_SERVER_EXPERIENCE_DIR": str(tmp_path / "log")})
    assert run.cases >= 100, run.output
    assert list((tmp_path / "log" / "steps").rglob("*.parquet")), "the fuzzed decisions that named an episode were logged"


def test_fuzz_a_policy_with_every_type(make_policy_dir: MakePolicyDir, tmp_path: Path) -> None:
    """int, float, bool and their lists, unbounded values, a mask of two heads."""
    folder = make_policy_dir(EVERY_TYPE_SCHEMA, TupleOutputs(EVERY_TYPE_INPUT_SIZE, [2, 3]), EVERY_TYPE_INPUT_SIZE)
    run = fuzz_server(folder, tmp_path, "every type")
    assert run.cases >= 100, run.output


def test_fuzz_a_policy_without_observations(make_policy_dir: MakePolicyDir, tmp_path: Path) -> None:
    """The original's schemas without `observations`: /predict_raw, its length read off the model."""
    folder = make_policy_dir(MOUSE_SCHEMA.split("observations:")[0], mlp(6, 4), 6)
    run = fuzz_server(folder, tmp_path, "without observations")
    assert run.cases > 0, run.output


# --- the spec and the server agree on every mask ------------------------------------------------


def _body_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The request body's JSON Schema, its references resolved against the spec's components."""
    schema = {"$defs": spec["components"]["schemas"], **spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]}
    resolved: dict[str, Any] = json.loads(json.dumps(schema).replace('"#/components/schemas/', '"#/$defs/'))
    return resolved


def _every_type_policy(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> TestClient:
    return serve(make_policy_dir(EVERY_TYPE_SCHEMA, TupleOutputs(EVERY_TYPE_INPUT_SIZE, [2, 3]), EVERY_TYPE_INPUT_SIZE))


def _spec_accepts(schema: dict[str, Any], body: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def test_the_spec_and_the_server_agree_on_every_mask(serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir) -> None:
    """All 32 masks: the spec accepts a mask exactly when the server answers it (422 when a head has
    no allowed action), on every route and in the raw vector; masked actions are never chosen."""
    client = _every_type_policy(serve, make_policy_dir)
    spec = client.get("/openapi.json").json()
    observation_schema, raw_schema = _body_schema(spec, "/predict"), _body_schema(spec, "/predict_raw")
    for bits in itertools.product([False, True], repeat=5):
        mask = list(bits)
        blocked = not any(mask[:2]) or not any(mask[2:])
        body = {"actionMask": mask, **EVERY_TYPE_REST}
        assert _spec_accepts(observation_schema, body) is not blocked, mask
        for path in ("/predict", "/predict_deterministic", "/distribution"):
            response = client.post(path, json=body, headers=AUTH)
            assert response.status_code == (422 if blocked else 200), (mask, path, response.text)
            if blocked:
                assert isinstance(response.json()["detail"], list)
            elif path == "/distribution":
                heads = response.json()["heads"]
                probabilities = heads[0]["probabilities"] + heads[1]["probabilities"]
                assert [p > 0 for p in probabilities] == mask
            else:
                move, speed = response.json()["actions"]
                assert mask[move] and mask[2 + speed]
        raw = {"obs": [float(b) for b in mask] + EVERY_TYPE_REST_ROW}
        assert _spec_accepts(raw_schema, raw) is not blocked, mask
        response = client.post("/predict_raw", json=raw, headers=AUTH)
        assert response.status_code == (422 if blocked else 200), (mask, response.text)


def test_the_spec_and_the_server_agree_where_a_raw_mask_entry_allows(
    serve: Callable[..., TestClient], make_policy_dir: MakePolicyDir
) -> None:
    """The server allows an action whose entry, as float32, is above 0.5: the spec's bound is the
    float64 number where that starts, not 0.5 itself (0.5000000000000001 is 0.5 in float32)."""
    client = _every_type_policy(serve, make_policy_dir)
    raw_schema = _body_schema(client.get("/openapi.json").json(), "/predict_raw")
    bound = raw_schema["$defs"]["RawObservation"]["properties"]["obs"]["allOf"][0]["anyOf"][0]["prefixItems"][0]["exclusiveMinimum"]
    for entry in (0.5, float(np.nextafter(0.5, 1.0)), bound, float(np.nextafter(bound, 1.0)), 0.75):
        raw = {"obs": [entry, 0.0, 1.0, 1.0, 1.0, *EVERY_TYPE_REST_ROW]}
        allowed = client.post("/predict_raw", json=raw, headers=AUTH).status_code == 200
        assert _spec_accepts(raw_schema, raw) is allowed, entry
        assert allowed is bool(np.float32(entry) > 0.5), entry
