"""Start-up refuses a broken policy folder the way users meet it: `uvicorn app:app` (and
`generate.py validate`) as subprocesses, exiting 1 with one line on stderr, never a traceback."""

from pathlib import Path

import pytest
import torch
from conftest import MOUSE_SCHEMA, MakePolicyDir, mlp, save_model
from servers import REPO, free_port, generate, run, uvicorn_command

START_FAILURE_TIMEOUT_S = 90.0  # a start that hangs fails the test (TimeoutExpired), it never blocks it

KEY = "parameters: {discrete: true, api_key: '1234567asdfgh'}\n"


def start_up_line(folder: Path) -> str:
    """`uvicorn app:app` serving `folder`: it must exit 1 having written exactly one line to stderr."""
    result = run(uvicorn_command(free_port()), cwd=REPO, env={"POLICY_SERVER_DIR": str(folder)}, timeout=START_FAILURE_TIMEOUT_S)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("policy-server: cannot start: "), lines[0]
    return lines[0]


# --- the model's input size ------------------------------------------------------------------


class TimesWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(6, 4))  # [in, out]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.w


def test_a_torchscript_model_of_another_size_is_told_by_its_true_size(make_policy_dir: MakePolicyDir) -> None:
    schema = KEY + "observations:\n" + "".join(f"  x{i}: {{type: float}}\n" for i in range(5))
    folder = make_policy_dir(schema, TimesWeight(), 6, "model.pt")
    line = start_up_line(folder)
    assert f"{folder / 'models' / 'model.pt'}: model: takes 6 input values but schema.yaml describes 5; fix: " in line


# --- outputs -----------------------------------------------------------------------------------


def nan_mlp() -> torch.nn.Module:
    module = mlp(6, 4)
    with torch.no_grad():
        module[0].weight[0, 0] = float("nan")  # NaN reaches every output through the hidden layer's sum
    return module


def test_a_model_of_nan_outputs_does_not_start(make_policy_dir: MakePolicyDir) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA, nan_mlp(), 6)
    line = start_up_line(folder)
    assert f"{folder / 'models' / 'model.pt2'}: model: gives NaN or infinite outputs" in line


# --- model files -------------------------------------------------------------------------------


def validate_line(folder: Path) -> str:
    result = generate("validate", str(folder))
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["empty", "torchscript"])
def test_a_pt2_that_is_no_exported_program_is_one_line(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "policy"
    (folder / "models").mkdir(parents=True)
    (folder / "schema.yaml").write_text(MOUSE_SCHEMA)
    model = folder / "models" / "model.pt2"
    model.write_bytes(b"" if case == "empty" else save_model(mlp(6, 4), tmp_path / "scripted.pt", 6).read_bytes())
    expected = {"empty": "is empty (0 bytes)", "torchscript": "is a TorchScript module, not a .pt2 file"}[case]
    assert f"{model}: model: {expected}; fix: " in start_up_line(folder)
    assert validate_line(folder).startswith(f"invalid: {model}: model: {expected}; fix: ")


# --- schema.yaml -------------------------------------------------------------------------------


def test_an_alias_bomb_in_the_schema_fails_at_once(make_policy_dir: MakePolicyDir) -> None:
    anchors = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    anchors += [f"&l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, 9)]
    schema = KEY + "observations:\n  x: {type: float}\nname: [" + ", ".join(anchors) + "]\n"
    folder = make_policy_dir(schema, mlp(1, 2), 1)
    assert f"{folder / 'schema.yaml'}: yaml: its aliases" in start_up_line(folder)


def test_an_observation_defined_twice_is_named(make_policy_dir: MakePolicyDir) -> None:
    schema = KEY + "observations:\n  x: {type: float}\n  y: {type: float}\n  x: {type: float}\n"
    folder = make_policy_dir(schema, mlp(2, 2), 2)
    assert f"{folder / 'schema.yaml'}: observations.x: defined twice (lines 3 and 5); fix: " in start_up_line(folder)
