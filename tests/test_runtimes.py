"""Model files (DESIGN.md §4.4): .pt2, .pt and saved_model.zip load, agree with eager, and fail in one line."""

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AUTH, MOUSE_OBSERVATION, MOUSE_SCHEMA, MakePolicyDir, TupleOutputs, mlp, save_model
from fastapi.testclient import TestClient

from policy_server.errors import ConfigError
from policy_server.loading import load_policy, load_policy_spec
from policy_server.runtimes import load_runtime

Serve = Callable[..., TestClient]


class WithState(torch.nn.Module):
    """Parameters, a persistent buffer and a constant tensor."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.linear = torch.nn.Linear(input_size, 3)
        self.register_buffer("scale", torch.tensor([2.0, -1.0, 0.5]))
        self.offset = torch.tensor([1.0, 0.0, -1.0])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(obs) * self.scale + self.offset


class WithNonPersistentBuffer(torch.nn.Module):
    """A buffer registered with persistent=False (e.g. a fixed normaliser): torch.export keeps it in
    `program.constants`, not in `program.state_dict`."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.linear = torch.nn.Linear(input_size, 3)
        self.register_buffer("shift", torch.tensor([0.25, 0.5, -0.75]), persistent=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(obs) + self.shift


class ThreeHeads(torch.nn.Module):
    """One tensor per head (scriptable, unlike a generator over a ModuleList)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        torch.manual_seed(14)
        self.a = torch.nn.Linear(input_size, 2)
        self.b = torch.nn.Linear(input_size, 3)
        self.c = torch.nn.Linear(input_size, 4)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a(obs), self.b(obs), self.c(obs)


class WithNorm(torch.nn.Module):
    """Buffers of a BatchNorm in eval mode, and two outputs."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.norm = torch.nn.BatchNorm1d(input_size)
        self.body = torch.nn.Linear(input_size, 4)
        self.value = torch.nn.Linear(input_size, 1)
        with torch.no_grad():
            self.norm.running_mean.copy_(torch.linspace(-1, 1, input_size))
            self.norm.running_var.copy_(torch.linspace(0.5, 2, input_size))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.norm(obs)
        return self.body(hidden), self.value(hidden)


MODELS: dict[str, Callable[[int], torch.nn.Module]] = {
    "mlp": lambda d: mlp(d, 4, seed=2),
    "tuple": ThreeHeads,
    "buffers-and-constants": WithState,
    "non-persistent-buffer": WithNonPersistentBuffer,
    "batchnorm-two-outputs": WithNorm,
}
# conftest.TupleOutputs exports but does not script (TorchScript refuses tuple[Tensor, ...])
PT2_MODELS = MODELS | {"tuple-outputs": lambda d: TupleOutputs(d, [2, 3])}


def eager_outputs(module: torch.nn.Module, rows: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(torch.from_numpy(rows))
    return [o.numpy().reshape(len(rows), -1) for o in (out if isinstance(out, tuple | list) else (out,))]


def assert_same(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == np.float32 and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6)


def rows_of(batch: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, width)).astype(np.float32)


def assert_one_line(error: ConfigError, path: Path) -> str:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    assert "fix: " in message
    return message


@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_files_give_the_eager_outputs(tmp_path: Path, name: str, suffix: str) -> None:
    width = 5
    module = MODELS[name](width).eval()
    runtime = load_runtime(save_model(module, tmp_path / f"model{suffix}", width))
    for batch in (1, 3, 17):
        rows = rows_of(batch, width, seed=batch)
        assert_same(runtime(rows), eager_outputs(module, rows))


@pytest.mark.parametrize("name", sorted(PT2_MODELS))
def test_pt2_fast_path_equals_the_exported_programs_module(tmp_path: Path, name: str) -> None:
    width = 6
    path = save_model(PT2_MODELS[name](width), tmp_path / "model.pt2", width)
    runtime = load_runtime(path)
    reference = torch.export.load(path).module()
    for batch in (1, 4, 33):
        rows = rows_of(batch, width, seed=batch)
        with torch.no_grad():
            out = reference(torch.from_numpy(rows))
        expected = [o.numpy().reshape(batch, -1) for o in (out if isinstance(out, tuple | list) else (out,))]
        assert_same(runtime(rows), expected)


def test_pt2_of_a_plain_mlp_runs_traced_with_the_programs_answers(tmp_path: Path) -> None:
    module = mlp(4, 2)
    runtime = load_runtime(save_model(module, tmp_path / "model.pt2", 4))
    assert isinstance(runtime.forward, torch.jit.ScriptModule)  # its graph, traced once at load
    rows = np.random.default_rng(0).normal(size=(33, 4)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(runtime(rows)[0], expected, rtol=1e-6, atol=1e-6)


def test_a_pt2_trace_is_cached_and_the_next_load_skips_torch_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, cache = mlp(5, 3), tmp_path / "cache"
    path = save_model(module, tmp_path / "model.pt2", 5)
    first = load_runtime(path, cache_dir=cache)
    (cached_file,) = cache.iterdir()
    assert cached_file.name.startswith(first.sha256) and torch.__version__ in cached_file.name

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.export.load was called")

    monkeypatch.setattr(torch.export, "load", no_export)
    second = load_runtime(path, cache_dir=cache)
    assert (second.format, second.input_size, second.sha256) == (first.format, 5, first.sha256) == ("torch.export", 5, first.sha256)
    rows = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    np.testing.assert_array_equal(second(rows)[0], first(rows)[0])


def test_a_broken_cached_trace_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, cache = save_model(mlp(5, 3), tmp_path / "model.pt2", 5), tmp_path / "cache"
    load_runtime(path, cache_dir=cache)
    (cached_file,) = cache.iterdir()
    cached_file.write_bytes(b"not a model")
    runtime = load_runtime(path, cache_dir=cache)  # the .pt2 itself, traced again
    assert isinstance(runtime.forward, torch.jit.ScriptModule)
    assert "ignoring the cached trace" in caplog.text
    assert load_runtime(path, cache_dir=cache).input_size == 5  # and the cache is whole again


def test_an_untraceable_pt2_is_not_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_runtime(save_model(CountsItsRows(), tmp_path / "model.pt2", 3), cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())


class CountsItsRows(torch.nn.Module):
    """Reads its batch size: a trace would freeze it, so this one must keep the exported graph."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows + torch.arange(rows.shape[0], dtype=rows.dtype).unsqueeze(1)


def test_pt2_that_reads_its_batch_size_keeps_the_graph(tmp_path: Path) -> None:
    runtime = load_runtime(save_model(CountsItsRows(), tmp_path / "model.pt2", 3))
    assert not isinstance(runtime.forward, torch.jit.ScriptModule | torch.nn.Module)  # the bare graph
    for batch in (1, 5, 40):
        rows = np.zeros((batch, 3), dtype=np.float32)
        np.testing.assert_array_equal(runtime(rows)[0], np.repeat(np.arange(batch, dtype=np.float32)[:, None], 3, axis=1))


@pytest.mark.parametrize("width", [1, 7, 24])
def test_input_size_is_read_from_the_file(tmp_path: Path, width: int) -> None:
    exported = load_runtime(save_model(mlp(width, 3), tmp_path / "model.pt2", width))
    assert exported.input_size == width
    assert "export" in exported.format
    scripted = load_runtime(save_model(mlp(width, 3), tmp_path / "model.pt", width))
    assert scripted.input_size is None  # TorchScript does not say: the size is found by running it
    assert width in scripted.candidate_input_sizes
    assert "torchscript" in scripted.format


def test_pt2_input_size_of_a_model_without_a_linear_first(tmp_path: Path) -> None:
    runtime = load_runtime(save_model(WithNorm(9), tmp_path / "model.pt2", 9))
    assert runtime.input_size == 9


# --- bundles ---------------------------------------------------------------------------------


def bundle(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def model_bytes(tmp_path: Path, suffix: str, module: torch.nn.Module, width: int) -> bytes:
    return save_model(module, tmp_path / "build" / f"model{suffix}", width).read_bytes()


@pytest.mark.parametrize("inner", ["model.pt2", "model.pt", "export/policy.pt2", "nested/dir/model.pt"])
def test_bundle_loads_the_model_inside(tmp_path: Path, inner: str) -> None:
    module = mlp(6, 4, seed=4).eval()
    path = bundle(tmp_path / "models" / "saved_model.zip", {inner: model_bytes(tmp_path, Path(inner).suffix, module, 6)})
    runtime = load_runtime(path)
    assert runtime.path == path and runtime.format.startswith("bundle/")
    assert runtime.input_size == (6 if inner.endswith(".pt2") else None)  # TorchScript does not say
    rows = rows_of(5, 6)
    assert_same(runtime(rows), eager_outputs(module, rows))


def test_bundle_schema_is_used_when_the_folder_has_none(tmp_path: Path, serve: Serve) -> None:
    folder = tmp_path / "policy"
    bundle_path = bundle(
        folder / "models" / "saved_model.zip",
        {"model.pt2": model_bytes(tmp_path, ".pt2", mlp(6, 4), 6), "schema.yaml": MOUSE_SCHEMA.encode()},
    )
    spec = load_policy_spec(folder)
    assert spec.path == bundle_path / "schema.yaml"
    assert spec.observations is not None and len(spec.observations) == 6
    policy = load_policy(folder, spec)
    assert policy.input_size == 6 and policy.info.format.startswith("bundle/")
    client = serve(folder)
    response = client.post("/predict/", json=MOUSE_OBSERVATION, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["actions"][0] in range(4)


def test_folder_schema_wins_over_the_bundles(tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    bundle(
        folder / "models" / "saved_model.zip",
        {
            "model.pt": model_bytes(tmp_path, ".pt", mlp(6, 4), 6),
            "schema.yaml": MOUSE_SCHEMA.replace("tuple: false", "tuple: true").encode(),
        },
    )
    (folder / "schema.yaml").write_text(MOUSE_SCHEMA.replace("parameters:", "name: from_folder\nparameters:"))
    spec = load_policy_spec(folder)
    assert spec.path == folder / "schema.yaml" and spec.name == "from_folder" and not spec.is_tuple
    policy = load_policy(folder, spec)
    assert policy.info.format == "bundle/torchscript" and policy.input_size == 6


def test_bundle_without_a_schema_and_no_folder_schema(tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    bundle(folder / "models" / "saved_model.zip", {"model.pt2": model_bytes(tmp_path, ".pt2", mlp(6, 4), 6)})
    with pytest.raises(ConfigError) as info:
        load_policy_spec(folder)
    assert_one_line(info.value, folder / "schema.yaml")


def test_bad_schema_inside_a_bundle_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    bundle_path = bundle(folder / "models" / "saved_model.zip", {"schema.yaml": b"parameters: {tuple: true}\n"})
    with pytest.raises(ConfigError) as info:
        load_policy_spec(folder)
    assert info.value.key == "parameters.discrete"
    assert_one_line(info.value, bundle_path / "schema.yaml")


# --- files that cannot be served: one line naming the file -----------------------------------


def folder_with(tmp_path: Path, files: dict[str, bytes], schema: str = MOUSE_SCHEMA) -> Path:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "schema.yaml").write_text(schema)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def load_fails(folder: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_policy(folder, load_policy_spec(folder))
    return info.value


def empty_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w"):
        pass
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


CORRUPT = {
    "garbage.pt2": ("models/model.pt2", b"this is not a model at all"),
    "empty.pt2": ("models/model.pt2", b""),
    "garbage.pt": ("models/model.pt", b"\x00\x01\x02 not torchscript"),
    "empty.pt": ("models/model.pt", b""),
    "zip-that-is-not": ("models/saved_model.zip", b"PK? no"),
    "empty-zip": ("models/saved_model.zip", empty_zip()),
    "zip-schema-only": ("models/saved_model.zip", zip_of({"schema.yaml": MOUSE_SCHEMA.encode()})),
    "zip-of-garbage-model": ("models/saved_model.zip", zip_of({"model.pt2": b"garbage"})),
    "zip-of-unknown-format": ("models/saved_model.zip", zip_of({"model.onnx": b"garbage", "model.h5": b"x"})),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_model_files_are_one_line(tmp_path: Path, case: str) -> None:
    name, data = CORRUPT[case]
    folder = folder_with(tmp_path, {name: data})
    error = load_fails(folder)
    assert_one_line(error, folder / name)
    assert error.key == "model"


def state_dict_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(mlp(6, 4).state_dict(), buffer)
    return buffer.getvalue()


MISNAMED = {
    "torchscript-as-pt2": ("model.pt2", ".pt", "is a TorchScript module, not a .pt2 file", "give it the suffix .pt"),
    "pt2-as-pt": ("model.pt", ".pt2", "is a torch.export program, not a .pt file", "give it the suffix .pt2"),
    "state-dict-as-pt2": ("model.pt2", "state_dict", "is a torch.save pickle", "torch.export.save"),
    "state-dict-as-pt": ("model.pt", "state_dict", "is a torch.save pickle", "torch.jit.save"),
    "empty-pt2": ("model.pt2", "empty", "is empty (0 bytes)", "torch.export.save"),
}


@pytest.mark.parametrize("case", sorted(MISNAMED))
def test_a_model_file_of_another_kind_is_named_for_what_it_is(tmp_path: Path, case: str) -> None:
    name, content, problem, fix = MISNAMED[case]
    special = {"empty": b"", "state_dict": state_dict_bytes()}
    data = special[content] if content in special else model_bytes(tmp_path, content, mlp(6, 4), 6)
    folder = folder_with(tmp_path, {f"models/{name}": data})
    error = load_fails(folder)
    assert_one_line(error, folder / "models" / name)
    assert error.problem.startswith(problem) and fix in error.fix, str(error)


def test_zip_with_two_models(tmp_path: Path) -> None:
    data = model_bytes(tmp_path, ".pt2", mlp(6, 4), 6)
    folder = folder_with(tmp_path, {"models/saved_model.zip": zip_of({"a.pt2": data, "b.pt": data})})
    message = assert_one_line(load_fails(folder), folder / "models" / "saved_model.zip")
    assert "a.pt2" in message and "b.pt" in message


def test_unknown_suffix(tmp_path: Path) -> None:
    schema = MOUSE_SCHEMA + "model: {path: models/model.onnx}\n"
    folder = folder_with(tmp_path, {"models/model.onnx": b"onnx bytes"}, schema)
    message = assert_one_line(load_fails(folder), folder / "models" / "model.onnx")
    assert ".onnx" in message
    with pytest.raises(ConfigError) as info:
        load_runtime(tmp_path / "policy" / "models" / "model.onnx")
    assert_one_line(info.value, folder / "models" / "model.onnx")


def test_unknown_suffixes_in_models_are_not_picked(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"models/model.h5": b"keras", "models/README.md": b"notes"})
    error = load_fails(folder)
    assert_one_line(error, folder / "models")
    assert error.key == "model"


def test_two_model_files_in_models(tmp_path: Path) -> None:
    data = model_bytes(tmp_path, ".pt2", mlp(6, 4), 6)
    folder = folder_with(tmp_path, {"models/model.pt2": data, "models/old.pt2": data})
    message = assert_one_line(load_fails(folder), folder / "models")
    assert "model.pt2" in message and "old.pt2" in message


def test_model_path_in_the_schema_picks_one_of_several(tmp_path: Path) -> None:
    good = model_bytes(tmp_path, ".pt2", mlp(6, 4), 6)
    schema = MOUSE_SCHEMA + "model: {path: models/chosen.pt2}\n"
    folder = folder_with(tmp_path, {"models/chosen.pt2": good, "models/other.pt": b"garbage"}, schema)
    policy = load_policy(folder, load_policy_spec(folder))
    assert policy.info.name == "chosen.pt2"


@pytest.mark.parametrize("models_dir", [True, False])
def test_no_model_file(tmp_path: Path, models_dir: bool) -> None:
    folder = folder_with(tmp_path, {})
    if models_dir:
        (folder / "models").mkdir()
    error = load_fails(folder)
    assert_one_line(error, folder / "models")
    assert error.key == "model"


def test_model_path_that_does_not_exist(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {}, MOUSE_SCHEMA + "model: {path: models/missing.pt2}\n")
    error = load_fails(folder)
    assert_one_line(error, folder / "models" / "missing.pt2")
    assert error.key == "model.path"


class ReturnsADict(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)

    def forward(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(obs)}


@pytest.mark.parametrize("model_name", ["model.pt2", "model.pt"])
def test_model_with_unusable_outputs_stops_start_up(make_policy_dir: MakePolicyDir, model_name: str) -> None:
    folder = make_policy_dir(MOUSE_SCHEMA, ReturnsADict(), 6, model_name)
    error = load_fails(folder)
    assert_one_line(error, folder / "models" / model_name)
