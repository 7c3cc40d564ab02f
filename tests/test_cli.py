"""`python generate.py COMMAND` (DESIGN.md section 7), run as a subprocess the way users run it."""

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import MOUSE_SCHEMA, MakePolicyDir, mlp, save_model
from servers import generate
from test_repository import make_policy

COMMANDS = ("copy_server_files", "clean", "validate", "openapi", "clients", "import_sb3", "export_onnx", "export_minari", "serve")


@pytest.fixture
def source(make_policy_dir: MakePolicyDir) -> Path:
    return make_policy_dir(MOUSE_SCHEMA, mlp(6, 4), 6)


def test_help_lists_every_command() -> None:
    result = generate("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    for command in COMMANDS:
        assert command in text


def test_help_of_each_command() -> None:
    with ThreadPoolExecutor(len(COMMANDS)) as pool:
        results = dict(zip(COMMANDS, pool.map(lambda command: generate(command, "--help"), COMMANDS), strict=True))
    for command, result in results.items():
        assert result.returncode == 0, (command, result.stderr)
        text = result.stdout + result.stderr
        assert "Traceback" not in text
        assert f"generate.py {command}" in text
        assert "--" in text  # it lists the flags


def test_copy_server_files_then_validate(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    (target / "models").mkdir(parents=True)
    save_model(mlp(6, 4), target / "models" / "old.pt", 6)  # a previous policy: replaced
    (target / "models" / "notes.txt").write_text("keep me")  # not a model: kept
    copied = generate("copy_server_files", str(source), "--target", str(target))
    assert copied.returncode == 0, copied.stderr
    assert (target / "schema.yaml").read_text() == MOUSE_SCHEMA
    assert (target / "models" / "model.pt2").read_bytes() == (source / "models" / "model.pt2").read_bytes()
    assert sorted(p.name for p in (target / "models").iterdir()) == ["model.pt2", "notes.txt"]

    validated = generate("validate", str(target))
    assert validated.returncode == 0, validated.stderr
    out = validated.stdout
    assert "input size 6" in out
    assert "torch.export" in out
    assert "move" in out and "4 actions" in out and "up" in out
    assert "Traceback" not in out + validated.stderr


def test_copy_server_files_from_a_folder_without_models(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = generate("copy_server_files", str(empty), "--target", str(tmp_path / "target"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "models" in lines[0] and "fix:" in lines[0]


def test_validate_a_torchscript_policy(make_policy_dir: MakePolicyDir) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA, mlp(6, 4), 6, model_name="model.pt")
    result = generate("validate", str(folder))
    assert result.returncode == 0, result.stderr
    assert "torchscript" in result.stdout and "input size 6" in result.stdout


def test_validate_a_broken_folder_fails_in_one_line(make_policy_dir: MakePolicyDir, tmp_path: Path) -> None:
    folders = {
        "unknown-type": make_policy_dir(MOUSE_SCHEMA.replace("mouse_col: {type: float", "mouse_col: {type: Matrix"), mlp(6, 4), 6),
        "size-mismatch": make_policy_dir(MOUSE_SCHEMA, mlp(5, 4), 5),
        "no-schema": tmp_path / "no-schema",
        "no-model": tmp_path / "no-model",
    }
    folders["no-schema"].mkdir()
    folders["no-model"].mkdir()
    (folders["no-model"] / "schema.yaml").write_text(MOUSE_SCHEMA)
    expected = {
        "unknown-type": ["observations.mouse_col.type", "Matrix"],
        "size-mismatch": ["model.pt2", "5", "6"],
        "no-schema": ["schema.yaml"],
        "no-model": ["models"],
    }
    with ThreadPoolExecutor(len(folders)) as pool:
        results = dict(zip(folders, pool.map(lambda folder: generate("validate", str(folder)), folders.values()), strict=True))
    for case, result in results.items():
        assert result.returncode != 0, case
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (case, result.stderr)
        assert "fix:" in lines[0], (case, lines[0])
        for word in expected[case]:
            assert word in lines[0], (case, word, lines[0])
        assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """Two policies: alpha with one version, beta with two (version N answers action N - 1)."""
    root = tmp_path / "policies"
    make_policy(root, "alpha", [1])
    make_policy(root, "beta", [1, 2])
    return root


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_validate_a_repository_checks_every_policy_and_version(repository: Path) -> None:
    result = generate("validate", str(repository))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"policy alpha ({repository / 'alpha'}): versions 1; would serve version 1 (the highest)" in out
    assert f"policy beta ({repository / 'beta'}): versions 1, 2; would serve version 2 (the highest)" in out
    for name, version in (("alpha", 1), ("beta", 1), ("beta", 2)):
        assert f"  ok: {name} version {version} from {repository / name / 'models' / str(version) / 'model.pt2'}\n" in out
    assert out.count("→ deterministic actions") == 3
    assert "→ deterministic actions [1]" in out  # beta's version 2, run on the example observation
    assert result.stderr == ""


def test_validate_a_repository_with_a_broken_version_fails_in_one_line(repository: Path) -> None:
    broken = repository / "beta" / "models" / "3" / "model.pt2"
    broken.parent.mkdir()
    broken.write_bytes(b"not a model")
    result = generate("validate", str(repository))
    assert result.returncode == 1
    (line,) = stderr_lines(result)
    assert line.startswith(f"invalid: {broken}: model: ") and "does not load" in line and "; fix: " in line
    assert "would serve version 3 (the highest)" in result.stdout  # what the server would try: the watcher keeps 2 serving
    assert "ok: beta version 2 from " in result.stdout and "ok: alpha version 1 from " in result.stdout  # the rest is still checked
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_names_the_pinned_version(repository: Path) -> None:
    schema = repository / "beta" / "schema.yaml"
    schema.write_text(schema.read_text() + "serving: {version: 1}\n")
    pinned = generate("validate", str(repository))
    assert pinned.returncode == 0, pinned.stderr
    assert "policy beta " in pinned.stdout and "versions 1, 2; would serve version 1 (pinned by serving.version)" in pinned.stdout

    schema.write_text(schema.read_text().replace("version: 1}", "version: 7}"))
    missing = generate("validate", str(repository))
    assert missing.returncode == 1
    (line,) = stderr_lines(missing)
    assert line == f"invalid: {schema}: serving.version: pins version 7; models/ holds 1, 2; fix: pin a version models/ holds"
    assert "ok: beta version 2 from " in missing.stdout


def test_validate_a_repository_with_a_broken_policy(repository: Path) -> None:
    (repository / "gamma" / "models").mkdir(parents=True)
    (repository / "gamma" / "schema.yaml").write_text(MOUSE_SCHEMA.replace("mouse_col: {type: float", "mouse_col: {type: Matrix"))
    result = generate("validate", str(repository))
    assert result.returncode == 1
    (line,) = stderr_lines(result)
    assert line.startswith(f"invalid: {repository / 'gamma' / 'schema.yaml'}: observations.mouse_col.type: ") and "fix:" in line
    assert "ok: alpha version 1 from " in result.stdout and "ok: beta version 2 from " in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_a_policy_folder_with_numbered_versions(tmp_path: Path) -> None:
    folder = make_policy(tmp_path, "solo", [1, 2])
    result = generate("validate", str(folder))
    assert result.returncode == 0, result.stderr
    assert f"policy solo ({folder}): versions 1, 2; would serve version 2 (the highest)" in result.stdout
    assert "  ok: solo version 1 from " in result.stdout and "  ok: solo version 2 from " in result.stdout


def test_openapi_writes_the_spec(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "spec.json"
    out.parent.mkdir()
    result = generate("openapi", "--directory", str(source), "--out", str(out))
    assert result.returncode == 0, result.stderr
    spec = json.loads(out.read_text())
    assert spec["openapi"].startswith("3.")
    assert spec["paths"]["/predict"]["post"]["operationId"] == "predict"
    for path in ("/predict_deterministic", "/distribution", "/predict_raw", "/predict_batch", "/health"):
        assert path in spec["paths"]
    observation = spec["components"]["schemas"]["Observation"]["properties"]
    assert observation["mouse_row"]["maximum"] == 4
    assert "1234567asdfgh" not in out.read_text()


def test_openapi_of_a_broken_folder_fails_in_one_line(make_policy_dir: MakePolicyDir, tmp_path: Path) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA.replace("  discrete: true\n", ""), mlp(6, 4), 6)
    out = tmp_path / "spec.json"
    result = generate("openapi", "--directory", str(folder), "--out", str(out))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "parameters.discrete" in lines[0]
    assert not out.exists()


def test_clean_removes_the_policy_and_generated_files(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert generate("copy_server_files", str(source), "--target", str(target)).returncode == 0
    save_model(mlp(6, 4), target / "models" / "extra.pt", 6)
    (target / "openapi.json").write_text("{}")
    (target / "clients" / "python").mkdir(parents=True)
    (target / "clients" / "python" / "client.py").write_text("")
    (target / "README.md").write_text("mine")
    (target / "models" / "notes.txt").write_text("mine")

    result = generate("clean", "--target", str(target))
    assert result.returncode == 0, result.stderr
    assert not (target / "schema.yaml").exists()
    assert list((target / "models").glob("*.pt*")) == []
    assert not (target / "openapi.json").exists()
    assert not (target / "clients").exists()
    assert (target / "README.md").read_text() == "mine"  # only what the server owns goes
    assert (target / "models" / "notes.txt").read_text() == "mine"
    assert (source / "schema.yaml").exists()  # the source is untouched

    again = generate("clean", "--target", str(target))
    assert again.returncode == 0, again.stderr
