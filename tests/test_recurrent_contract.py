"""The recurrent model contract, `forward(obs, *state) -> (outputs, *new_state)`, in each format the
server loads (.pt2, TorchScript, ONNX), and the one-line start-up errors when model and schema disagree."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import API_KEY, AUTH
from fastapi.testclient import TestClient
from servers import REPO, free_port, run, serve_command, uvicorn_command
from test_startup_errors import START_FAILURE_TIMEOUT_S, start_up_line

from policy_server.errors import ConfigError
from policy_server.loading import load_policy, load_policy_spec

Serve = Callable[..., TestClient]
OBS, HIDDEN, ACTIONS = 3, 5, 4
STEPS = 6


class TinyGru(torch.nn.Module):
    """Logits from a GRU cell's new state; the state is [B, 1, HIDDEN] (a layer axis, as LSTMs have)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.cell = torch.nn.GRUCell(OBS, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, ACTIONS)

    def forward(self, obs: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = self.cell(obs, h.squeeze(1))
        return self.head(new), new.unsqueeze(1)


def schema(state: str = "{state: [{name: h, shape: [1, 5]}]}") -> str:
    recurrent = f"recurrent: {state}\n" if state else ""
    return f"parameters: {{discrete: true, api_key: '{API_KEY}'}}\nobservations:\n  obs: {{type: 'List[float]', min_items: 3, max_items: 3}}\n{recurrent}"


def save_recurrent(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, OBS), torch.zeros(2, 1, HIDDEN))
    if path.suffix == ".pt":
        torch.jit.save(torch.jit.trace(module.eval(), example), path)
        return
    batch = torch.export.Dim("batch")
    program = torch.export.export(module.eval(), example, dynamic_shapes=({0: batch}, {0: batch}))
    if path.suffix == ".pt2":
        torch.export.save(program, path)
    else:
        torch.onnx.export(program, f=path, dynamo=True, external_data=False, verbose=False)


def policy_folder(root: Path, model_name: str, schema_text: str, module: torch.nn.Module | None = None) -> Path:
    folder = root / model_name.replace(".", "-")
    folder.mkdir(parents=True)
    (folder / "schema.yaml").write_text(schema_text)
    save_recurrent(module or TinyGru(), folder / "models" / model_name)
    return folder


@pytest.mark.parametrize("model_name", ["model.pt2", "model.pt", "model.onnx"])
def test_each_format_serves_interleaved_episodes_as_the_module_computes_them(model_name: str, tmp_path: Path, serve: Serve) -> None:
    module = TinyGru().eval()
    client = serve(policy_folder(tmp_path, model_name, schema()))
    rng = np.random.default_rng(0)
    states = {episode: torch.zeros(1, 1, HIDDEN) for episode in ("left", "right")}
    for step in range(2 * STEPS):
        episode = ("left", "right")[step % 3 % 2]  # interleaved, not alternating
        observation = rng.uniform(-1, 1, OBS).astype(np.float32)
        with torch.no_grad():
            logits, states[episode] = module(torch.from_numpy(observation)[None], states[episode])
        expected = torch.softmax(logits.double(), dim=1)[0].numpy()
        answer = client.post("/predict_deterministic", json={"obs": observation.tolist()}, params={"episode_id": episode}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["actions"] == [int(expected.argmax())]
        assert abs(answer.json()["probability"] - expected.max()) < 1e-5
    info = client.get("/info", headers=AUTH).json()
    assert info["state_size"] == HIDDEN and info["recurrent"]["episodes"] == 2


def _config_error(folder: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_policy(folder, load_policy_spec(folder))
    message = str(raised.value)
    assert "\n" not in message and "fix:" in message, message
    return message


def test_a_state_shape_the_file_declares_otherwise_is_named(tmp_path: Path) -> None:
    for model_name in ("model.pt2", "model.onnx"):
        message = _config_error(policy_folder(tmp_path / "declared", model_name, schema("{state: [{name: h, shape: [1, 4]}]}")))
        assert "recurrent.state[0].shape" in message and "is [1, 4] for 'h'" in message and "[1, 5]" in message


def test_torchscript_is_checked_by_running_it_on_zero_state(tmp_path: Path) -> None:
    """A TorchScript file does not declare its inputs: a wrong shape fails the run on zero state
    (told as such, not as a wrong input size); a new state of another width is named."""
    message = _config_error(policy_folder(tmp_path / "a", "model.pt", schema("{state: [{name: h, shape: [1, 4]}]}")))
    assert "fails on 2 rows of 3 values with zero state (h [1, 4])" in message and "forward(obs[B, D], *state)" in message

    class WiderState(TinyGru):
        def forward(self, obs: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, new = super().forward(obs, h)
            return logits, torch.cat([new, new], dim=2)

    message = _config_error(policy_folder(tmp_path / "b", "model.pt", schema(), WiderState()))
    assert "recurrent.state[0].shape" in message and "holds 5 values per row; the model returns 10 for 'h'" in message


def test_state_inputs_without_a_recurrent_section_and_a_count_that_differs(tmp_path: Path) -> None:
    message = _config_error(policy_folder(tmp_path / "a", "model.pt2", schema(state="")))
    assert "schema.yaml: recurrent:" in message and "takes 1 input(s) after the rows" in message
    two = "{state: [{name: h, shape: [1, 5]}, {name: c, shape: [1, 5]}]}"
    message = _config_error(policy_folder(tmp_path / "b", "model.pt2", schema(two)))
    assert "recurrent.state" in message and "lists 2 state tensor(s); the model takes 1 input(s) after the rows" in message


class NoNewState(torch.nn.Module):
    def forward(self, obs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return obs.sum(dim=1, keepdim=True).expand(-1, ACTIONS) + h.sum()


def test_a_model_that_returns_no_new_state_is_refused_at_start_up(tmp_path: Path) -> None:
    line = start_up_line(policy_folder(tmp_path, "model.pt", schema(), NoNewState()))
    assert "returns 1 tensor(s); a recurrent model returns its outputs, then its 1 new state tensor(s)" in line


@pytest.mark.parametrize("key", ["state", "shape", "expiry", "episodes"])
def test_a_bad_recurrent_section_is_one_line(key: str, tmp_path: Path) -> None:
    sections = {
        "state": ("{state: []}", "recurrent.state"),
        "shape": ("{state: [{name: h, shape: [0, 5]}]}", "recurrent.state[0].shape"),
        "expiry": ("{state: [{name: h, shape: [1, 5]}], idle_expiry_seconds: 0}", "recurrent.idle_expiry_seconds"),
        "episodes": ("{state: [{name: h, shape: [1, 5]}], max_episodes: 0}", "recurrent.max_episodes"),
    }
    section, named = sections[key]
    line = start_up_line(policy_folder(tmp_path, "model.pt2", schema(section)))
    assert f"{named}:" in line or f"{named} " in line, line


def test_several_workers_refuse_a_recurrent_policy(tmp_path: Path) -> None:
    """Each worker would hold its own episodes: `generate.py serve --workers 2` and `uvicorn` with
    POLICY_SERVER_WORKERS=2 both exit 1 with one line that says why."""
    folder = policy_folder(tmp_path, "model.pt2", schema())
    served = run([*serve_command(folder, free_port()), "--workers", "2"], cwd=tmp_path, timeout=START_FAILURE_TIMEOUT_S)
    assert served.returncode == 1 and len(served.stderr.splitlines()) == 1, served.stderr
    assert (
        "recurrent" in served.stderr and "2 workers would split them" in served.stderr and "fix: serve it with one worker" in served.stderr
    )
    env = {"POLICY_SERVER_DIR": str(folder), "POLICY_SERVER_WORKERS": "2"}
    alone = run(uvicorn_command(free_port()), cwd=REPO, env=env, timeout=START_FAILURE_TIMEOUT_S)
    assert alone.returncode == 1 and "2 workers would split them" in alone.stderr, alone.stderr
