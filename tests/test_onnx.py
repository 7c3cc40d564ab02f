"""ONNX (DESIGN.md §4.4): `export_onnx` from .pt2 and .pt, served by onnxruntime with the same answers."""

import random
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import MOUSE_SCHEMA, REPO, mlp, save_model
from fastapi.testclient import TestClient
from test_runtimes import ThreeHeads

from policy_server.cli import Commands
from policy_server.errors import ConfigError
from policy_server.loading import load_policy, load_policy_spec
from policy_server.runtimes import load_runtime
from policy_server.schema import PolicySpec

Serve = Callable[..., TestClient]
OBSERVATIONS = 50
TOLERANCE = 1e-5

TUPLE_SCHEMA = """\
parameters: {discrete: true, tuple: true, api_key: "1234567asdfgh"}
observations:
  x: {type: "List[float]", min_items: 5, max_items: 5, minimum: -2, maximum: 2}
actions: [{name: a, n: 2}, {name: b, n: 3}, {name: c, n: 4}]
"""


def random_observation(spec: PolicySpec, rng: random.Random) -> dict[str, Any]:
    """Values within each field's bounds (±3 where unbounded); every mask entry true."""

    def value(kind: str, low: float | None, high: float | None) -> Any:
        return True if kind == "bool" else rng.uniform(-3.0 if low is None else low, 3.0 if high is None else high)

    observation: dict[str, Any] = {}
    for field in spec.observations or ():
        if field.is_list:
            observation[field.name] = [value(field.kind, field.minimum, field.maximum) for _ in range(field.width or 1)]
        else:
            observation[field.name] = value(field.kind, field.minimum, field.maximum)
    return observation


def distributions(client: TestClient, observations: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    headers = {"access-token": "1234567asdfgh"}
    answers = [client.post("/distribution", json=observation, headers=headers) for observation in observations]
    assert all(answer.status_code == 200 for answer in answers), answers[0].text
    return [answer.json()["heads"] for answer in answers]


def assert_same_heads(expected: list[list[dict[str, Any]]], actual: list[list[dict[str, Any]]]) -> None:
    for heads, others in zip(expected, actual, strict=True):
        assert [h["name"] for h in heads] == [h["name"] for h in others]
        for head, other in zip(heads, others, strict=True):
            for key in ("probabilities", "mean", "std"):
                if head.get(key) is None:
                    assert other.get(key) is None
                else:
                    np.testing.assert_allclose(other[key], head[key], rtol=0, atol=TOLERANCE)


def export_beside(source: Path, tmp_path: Path) -> Path:
    """`export_onnx SOURCE --out TWIN/models/model.onnx`: a folder serving the ONNX twin with the same schema."""
    twin = tmp_path / f"{source.name}-onnx"
    (twin / "models").mkdir(parents=True)
    shutil.copy2(source / "schema.yaml", twin / "schema.yaml")
    Commands().export_onnx(str(source), out=str(twin / "models" / "model.onnx"))
    return twin


@pytest.fixture(scope="module")
def mouse_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mouse example's model as ONNX, exported once."""
    folder = tmp_path_factory.mktemp("mouse")
    shutil.copytree(REPO / "examples" / "mouse_and_cheese", folder, dirs_exist_ok=True)
    onnx = folder / "model.onnx"
    Commands().export_onnx(str(folder), out=str(onnx))
    return onnx


@pytest.mark.parametrize("example", ["mouse_and_cheese", "pendulum", "tuple_masking"])
def test_onnx_from_pt2_serves_the_same_distribution(example: str, tmp_path: Path, serve: Serve) -> None:
    """Discrete, continuous (means and log-stds) and tuple heads with a mask, from the examples' .pt2."""
    source = tmp_path / example
    shutil.copytree(REPO / "examples" / example, source)
    twin = export_beside(source, tmp_path)
    spec = load_policy_spec(source)
    rng = random.Random(7)
    observations = [random_observation(spec, rng) for _ in range(OBSERVATIONS)]

    assert serve(twin).get("/info", headers={"access-token": "1234567asdfgh"}).json()["format"] == "onnx"
    assert_same_heads(distributions(serve(source), observations), distributions(serve(twin), observations))


@pytest.mark.parametrize(
    ("schema", "module", "input_size"),
    [(MOUSE_SCHEMA, mlp(6, 4), 6), (TUPLE_SCHEMA, ThreeHeads(5), 5)],
    ids=["discrete", "one-tensor-per-head"],
)
def test_onnx_from_torchscript_serves_the_same_distribution(
    schema: str, module: torch.nn.Module, input_size: int, tmp_path: Path, serve: Serve
) -> None:
    source = tmp_path / "torchscript"
    (source / "schema.yaml").parent.mkdir()
    (source / "schema.yaml").write_text(schema)
    save_model(module, source / "models" / "model.pt", input_size)
    twin = export_beside(source, tmp_path)
    rng = random.Random(8)
    observations = [random_observation(load_policy_spec(source), rng) for _ in range(OBSERVATIONS)]

    assert_same_heads(distributions(serve(source), observations), distributions(serve(twin), observations))


def test_export_onnx_into_models_says_how_to_serve_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "mouse"
    shutil.copytree(REPO / "examples" / "mouse_and_cheese", source)
    Commands().export_onnx(str(source))
    out = capsys.readouterr().out
    assert (source / "models" / "model.onnx").is_file()
    assert "model: {path: models/model.onnx}" in out
    with open(source / "schema.yaml", "a") as schema:  # as the message says
        schema.write("model: {path: models/model.onnx}\n")
    Commands().validate(str(source))
    out = capsys.readouterr().out
    assert "model.onnx (onnx), input size 6" in out
    assert "head move: discrete, 4 actions" in out
    assert "→ deterministic actions [" in out


def test_input_size_is_read_from_the_graph(mouse_onnx: Path, tmp_path: Path) -> None:
    assert load_runtime(mouse_onnx).input_size == 6

    # A schema of 5 values against a 6-input graph: the graph's size is exact, so start-up stops.
    folder = tmp_path / "five"
    (folder / "models").mkdir(parents=True)
    shutil.copy2(mouse_onnx, folder / "models" / "model.onnx")
    (folder / "schema.yaml").write_text(MOUSE_SCHEMA.replace("  cheese_col: {type: float}\n", ""))
    with pytest.raises(ConfigError, match=r"takes 6 input values but schema\.yaml describes 5"):
        load_policy(folder, load_policy_spec(folder))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export pickling, inside torch
def test_weights_saved_beside_the_graph_load(tmp_path: Path) -> None:
    """torch.onnx.export's default writes the weights to model.onnx.data next to model.onnx."""
    program = torch.export.export(mlp(6, 4).eval(), (torch.zeros(2, 6),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "model.onnx"
    torch.onnx.export(program, f=path, dynamo=True, external_data=True, verbose=False)
    assert (tmp_path / "model.onnx.data").is_file()
    rows = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(load_runtime(path)(rows)[0], program.module()(torch.from_numpy(rows)).detach().numpy(), atol=TOLERANCE)


def test_onnx_in_a_bundle(mouse_onnx: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundled" / "models" / "saved_model.zip"
    bundle.parent.mkdir(parents=True)
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.write(mouse_onnx, "model.onnx")
        archive.write(REPO / "examples" / "mouse_and_cheese" / "schema.yaml", "schema.yaml")
    policy = load_policy(bundle.parent.parent, load_policy_spec(bundle.parent.parent))
    assert policy.describe()["format"] == "bundle/onnx"
    assert policy.input_size == 6


def test_a_corrupt_onnx_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "corrupt"
    (folder / "models").mkdir(parents=True)
    (folder / "schema.yaml").write_text(MOUSE_SCHEMA)
    (folder / "models" / "model.onnx").write_bytes(b"\x08\x07not a protobuf at all")
    with pytest.raises(SystemExit) as exit_info:
        Commands().validate(str(folder))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "model.onnx: model: does not load as .onnx" in error
    assert "fix: export it with torch.onnx.export" in error


def test_without_onnxruntime_the_error_names_the_extra(mouse_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is not installed
    with pytest.raises(ConfigError, match=r"install the onnx extra: pip install \.\[onnx\]"):
        load_runtime(mouse_onnx)
