"""Shared fixtures: policy folders made on the fly with small torch models of known behaviour."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from policy_server.server import build_app
from policy_server.settings import Settings

API_KEY = "1234567asdfgh"
AUTH = {"access-token": API_KEY}
REPO = Path(__file__).resolve().parent.parent
PATHMIND_SCHEMAS = REPO / "tests" / "data" / "pathmind-schemas"  # Apache-2.0, see its README.md


class FixedLogits(torch.nn.Module):
    """Ignores nothing: out = obs @ weight + bias, so a test can choose the logits it wants."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            self.linear.weight.copy_(weight.T)
            self.linear.bias.copy_(bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(obs)


class TupleOutputs(torch.nn.Module):
    """One logits tensor per head, as the original's tuple models returned them."""

    def __init__(self, input_size: int, head_sizes: list[int]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(input_size, n) for n in head_sizes)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(head(obs) for head in self.heads)


def mlp(input_size: int, output_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(input_size, 16), torch.nn.Tanh(), torch.nn.Linear(16, output_size))


def constant_logits(input_size: int, logits: list[float]) -> torch.nn.Module:
    """A model whose logits are `logits` whatever the observation (weights 0)."""
    return FixedLogits(torch.zeros(input_size, len(logits)), torch.tensor(logits))


def save_model(module: torch.nn.Module, path: Path, input_size: int) -> Path:
    """Save as .pt2 (torch.export, dynamic batch) or .pt (TorchScript), by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    if path.suffix == ".pt2":
        example = (torch.zeros(2, input_size),)
        program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, path)
    else:
        torch.jit.save(torch.jit.script(module), path)
    return path


MakePolicyDir = Callable[..., Path]


@pytest.fixture
def make_policy_dir(tmp_path: Path) -> MakePolicyDir:
    """make_policy_dir(schema_text, module, input_size, model_name="model.pt2") → a policy folder."""
    counter = iter(range(1000))

    def make(schema: str, module: torch.nn.Module, input_size: int, model_name: str = "model.pt2") -> Path:
        folder = tmp_path / f"policy{next(counter)}"
        folder.mkdir()
        (folder / "schema.yaml").write_text(schema)
        save_model(module, folder / "models" / model_name, input_size)
        return folder

    return make


def settings_for(folder: Path, **overrides: object) -> Settings:
    """Settings for a test app: SDKs only on request, cached beside the policy folder."""
    defaults: dict[str, object] = {
        "sdks_in_background": False,
        "sdk_cache_dir": folder.parent / "sdk-cache",
        "model_cache_dir": folder.parent / "model-cache",
    }
    return Settings(policy_dir=folder, **(defaults | overrides))  # type: ignore[arg-type]


@pytest.fixture
def serve() -> Iterator[Callable[..., TestClient]]:
    """serve(folder, **settings) → a TestClient with the app's lifespan running (closed after)."""
    clients: list[TestClient] = []

    def start(folder: Path, **overrides: object) -> TestClient:
        client = TestClient(build_app(settings_for(folder, **overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


MOUSE_SCHEMA = """\
parameters:
  discrete: true
  tuple: false
  api_key: "1234567asdfgh"
observations:
  mouse_row: {type: float, minimum: 0, maximum: 4, description: "row of the mouse"}
  mouse_col: {type: float, minimum: 0, maximum: 4}
  mouse_row_distance: {type: float}
  mouse_col_distance: {type: float}
  cheese_row: {type: float}
  cheese_col: {type: float}
actions:
  - {name: move, n: 4, labels: [up, down, left, right]}
"""


def mouse_observation(mouse: tuple[int, int], cheese: tuple[int, int]) -> dict[str, float]:
    """The mouse_and_cheese observation of a mouse and a cheese at (row, col)."""
    return {
        "mouse_row": mouse[0],
        "mouse_col": mouse[1],
        "mouse_row_distance": cheese[0] - mouse[0],
        "mouse_col_distance": cheese[1] - mouse[1],
        "cheese_row": cheese[0],
        "cheese_col": cheese[1],
    }


MOUSE_OBSERVATION = {"mouse_row": 1, "mouse_col": 2, "mouse_row_distance": 0, "mouse_col_distance": 1, "cheese_row": 1, "cheese_col": 3}


@pytest.fixture
def mouse_dir(make_policy_dir: MakePolicyDir) -> Path:
    return make_policy_dir(MOUSE_SCHEMA, mlp(6, 4), 6)


@pytest.fixture
def mouse(serve: Callable[..., TestClient], mouse_dir: Path) -> TestClient:
    return serve(mouse_dir)


@pytest.fixture(autouse=True, scope="session")
def _caches_and_logs_in_the_sessions_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Settings read from the environment cache SDKs and model traces under XDG_CACHE_HOME, and
    SB3's `learn` makes a log folder in /tmp for every model it trains unless SB3_LOGDIR names one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        patch.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3-logs")))
        yield
