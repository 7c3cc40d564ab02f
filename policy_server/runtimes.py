"""Model files → one callable: float32 rows [B, D] → the model's raw outputs, as 2-D arrays.

A recurrent model takes its state tensors after the rows (`forward(obs, *state)`, each state
tensor [B, ...]) and returns its new state after its outputs; the callable passes them through.

Formats: `.pt2` (torch.export, what torch recommends), `.pt` (TorchScript, what most existing
policies are), `.onnx` (run with onnxruntime, an optional extra) and `saved_model.zip` (a bundle
holding one of them, optionally with a schema.yaml). Nothing here knows about schemas or HTTP.
"""

import hashlib
import io
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.export.passes import move_to_device_pass

from policy_server.errors import ConfigError, first_line

logger = logging.getLogger("policy_server")

MODEL_SUFFIXES = (".pt2", ".pt", ".onnx", ".zip")
BUNDLED_SUFFIXES = (".pt2", ".pt", ".onnx")
BUNDLE_SCHEMA = "schema.yaml"


@dataclass
class Runtime:
    """A loaded model. `input_size` is what the file says it takes (None: the file does not say);
    then `candidate_input_sizes` are the sizes worth trying on it (its weights' dimensions).
    `state_shapes`: the shapes (less the batch dimension, None for a dynamic size) of the inputs
    after the rows, as the file declares them; None when the file does not say (TorchScript)."""

    path: Path
    format: str
    forward: Callable[..., Any]
    input_size: int | None
    device: str = "cpu"
    sha256: str = ""  # of the file as served, so /info tells which model answers
    candidate_input_sizes: tuple[int, ...] = ()
    state_shapes: tuple[tuple[int | None, ...], ...] | None = None

    def __call__(self, rows: np.ndarray, *state: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            outputs = self.forward(torch.from_numpy(rows).to(self.device), *(torch.from_numpy(s).to(self.device) for s in state))
        return [_as_matrix(output, len(rows)) for output in _flatten_outputs(outputs)]


def _flatten_outputs(outputs: Any) -> Sequence[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    if isinstance(outputs, list | tuple) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return outputs
    raise TypeError(f"the model returned {type(outputs).__name__}; it must return a tensor or a tuple of tensors")


def _as_matrix(output: torch.Tensor, batch: int) -> np.ndarray:
    array = output.detach().to("cpu", torch.float32).numpy()
    return array.reshape(batch, -1)


def find_model_file(policy_dir: Path, declared: Path | None) -> Path:
    """The model to serve: `model.path` from the schema, else the one model file in models/."""
    if declared is not None:
        path = declared if declared.is_absolute() else policy_dir / declared
        if not path.is_file():
            raise ConfigError(path, "model.path", "no such file", "point model.path at the model file, relative to the schema's folder")
        return path
    models = policy_dir / "models"
    candidates = sorted(p for p in models.glob("*") if p.suffix in MODEL_SUFFIXES and p.is_file()) if models.is_dir() else []
    if not candidates:
        raise ConfigError(
            models,
            "model",
            "no model file (.pt2, .pt, .onnx or saved_model.zip) found",
            "put the model in models/ (python generate.py copy_server_files examples/mouse_and_cheese)",
        )
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ConfigError(
            models, "model", f"several model files ({names})", "keep one, or name it in schema.yaml under 'model: {path: ...}'"
        )
    return candidates[0]


def bundle_schema(bundle: Path) -> bytes | None:
    """The schema.yaml a saved_model.zip carries, if any."""
    with _open_bundle(bundle) as archive:
        names = [n for n in _bundle_members(archive) if Path(n).name == BUNDLE_SCHEMA]
        return archive.read(names[0]) if names else None


def _bundle_members(archive: zipfile.ZipFile) -> list[str]:
    """Files in the zip, less the `__MACOSX/` and `._*` shadows macOS adds."""
    return [n for n in archive.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/") and not Path(n).name.startswith("._")]


def load_runtime(path: Path, device: str = "cpu", cache_dir: Path | None = None) -> Runtime:
    """The model of `path`, its weights on `device` (ONNX models always run on the CPU).
    `cache_dir` keeps the TorchScript traces of `.pt2` models between starts (see `TraceCache`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "model", f"cannot be read ({exc.strerror})", "check the file's permissions") from None
    sha256 = hashlib.sha256(data).hexdigest()
    cache = TraceCache(cache_dir, sha256) if cache_dir is not None and device == "cpu" else None
    runtime = _load_bundle(path, device, cache) if path.suffix == ".zip" else _load_bytes(path, path.suffix, data, device, cache)
    runtime.sha256 = sha256
    return runtime


class TraceCache:
    """Where the verified TorchScript trace of a `.pt2` waits for the next start.

    Loading a `.pt2` imports torch's export machinery (sympy, dynamo): ~1.6 s and ~100 MiB more
    than loading TorchScript. The trace served is the same either way, so a restart loads it from
    here, keyed by the model file's sha256 and torch's version. Best effort: a cache that cannot
    be read or written only costs the slower start.
    """

    def __init__(self, directory: Path, sha256: str) -> None:
        self.file = directory / f"{sha256}-torch{torch.__version__}.pt"

    def load(self) -> tuple[torch.jit.ScriptModule, int] | None:
        if not self.file.is_file():
            return None
        try:
            extra = {"input_size": ""}
            module = torch.jit.load(str(self.file), _extra_files=extra)
            return module, int(extra["input_size"])
        except Exception as exc:  # a truncated or foreign file: load the .pt2 itself, and write it anew
            logger.warning("ignoring the cached trace %s (%s)", self.file, first_line(exc))
            return None

    def save(self, module: torch.jit.ScriptModule, input_size: int) -> None:
        partial_file = self.file.with_suffix(f".{os.getpid()}.partial")  # workers may write at once: rename is atomic
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            torch.jit.save(module, str(partial_file), _extra_files={"input_size": str(input_size)})
            partial_file.replace(self.file)
        except OSError as exc:
            logger.warning("cannot cache the model's trace in %s (%s): the next start loads the .pt2 again", self.file.parent, exc)


def gpu_memory(device: str) -> dict[str, int] | None:
    """Bytes allocated by torch and the card's total, for /info; None on the CPU."""
    if not device.startswith("cuda"):
        return None
    index = torch.device(device).index or 0
    return {"used_bytes": torch.cuda.memory_allocated(index), "total_bytes": torch.cuda.get_device_properties(index).total_memory}


def _load_bytes(path: Path, suffix: str, data: bytes, device: str = "cpu", cache: TraceCache | None = None) -> Runtime:
    loaders = {
        ".pt2": partial(_load_exported, device=device, cache=cache),
        ".pt": partial(_load_torchscript, device=device),
        ".onnx": _load_onnx,
    }
    if suffix not in loaders:
        raise ConfigError(
            path, "model", f"unknown model format '{suffix}'", "use a .pt2 (torch.export), .pt (TorchScript), .onnx or saved_model.zip"
        )
    try:
        return loaders[suffix](path, data)
    except ConfigError:
        raise
    except Exception as exc:  # torch raises many kinds; the user needs the first line
        raise _load_failure(path, suffix, data, exc) from None


_SAVE_HINTS = {
    ".pt2": "save it with torch.export.save",
    ".pt": "save it with torch.jit.save",
    ".onnx": "export it with torch.onnx.export (or python generate.py export_onnx DIR)",
}
_ARCHIVE_KINDS = {
    ".pt2": "a torch.export program",
    ".pt": "a TorchScript module",
    "torch.save": "a torch.save pickle (weights, or a pickled module, without the model's code)",
}


def _load_failure(path: Path, suffix: str, data: bytes, exc: Exception) -> ConfigError:
    """Why `data` does not load as `suffix`, as plainly as its bytes tell: torch's own message
    for a file of the other torch format is about a member missing from a "corrupted" archive."""
    if not data:
        return ConfigError(path, "model", "is empty (0 bytes)", f"copy the model file again, or {_SAVE_HINTS[suffix]}")
    kind = _torch_archive_kind(data)
    if kind in (".pt2", ".pt") and kind != suffix:
        return ConfigError(path, "model", f"is {_ARCHIVE_KINDS[kind]}, not a {suffix} file", f"give it the suffix {kind}")
    if kind == "torch.save":
        return ConfigError(
            path, "model", f"is {_ARCHIVE_KINDS[kind]}", "save the whole model with torch.export.save (.pt2) or torch.jit.save (.pt)"
        )
    return ConfigError(path, "model", f"does not load as {suffix} ({first_line(exc)})", _SAVE_HINTS[suffix])


def _torch_archive_kind(data: bytes) -> str | None:
    """Which torch writer made this zip, told by its members (under one top folder): '.pt2',
    '.pt', 'torch.save', or None (not a zip, or none of them)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {name.split("/", 1)[-1] for name in archive.namelist()}
    except zipfile.BadZipFile:
        return None
    if "archive_format" in members:
        return ".pt2"
    if "constants.pkl" in members and any(name.startswith("code/") for name in members):
        return ".pt"
    return "torch.save" if "data.pkl" in members else None


def _load_torchscript(path: Path, data: bytes, device: str = "cpu") -> Runtime:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
        module = torch.jit.load(io.BytesIO(data), map_location=device)
    module.eval()
    return Runtime(
        path=path, format="torchscript", forward=module, input_size=None, device=device, candidate_input_sizes=_weight_dimensions(module)
    )


def _weight_dimensions(module: torch.nn.Module) -> tuple[int, ...]:
    """Every dimension of the weights and buffers, first seen first: a TorchScript file does not
    declare its input size, and the input is multiplied with, or shaped like, one of them."""
    tensors = chain(module.parameters(), module.buffers())
    return tuple(dict.fromkeys(int(size) for tensor in tensors for size in tensor.shape if size > 0))


def _load_exported(path: Path, data: bytes, device: str = "cpu", cache: TraceCache | None = None) -> Runtime:
    cached = cache.load() if cache is not None else None
    if cached is not None:
        module, width = cached
        return Runtime(path=path, format="torch.export", forward=module, input_size=width, device=device)
    program = _export_load(path, data)
    if device != "cpu":
        program = move_to_device_pass(program, device)
    forward, width = _exported_forward(program), _exported_width(program)
    if cache is not None and width is not None and isinstance(forward, torch.jit.ScriptModule):
        cache.save(forward, width)
    state_shapes = tuple(shape[1:] for shape in _exported_input_shapes(program)[1:])
    return Runtime(path=path, format="torch.export", forward=forward, input_size=width, device=device, state_shapes=state_shapes)


class _KeptRecords(logging.Handler):
    """Keeps the records it is given, off the console."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _export_load(path: Path, data: bytes) -> torch.export.ExportedProgram:
    """torch.export.load, quiet: on a file it cannot read it logs the error with its traceback to
    the console, then raises a vaguer one ("check the warnings above"). The logged error is raised
    instead, for the one-line message; what it logs on a file that loads is logged here in one line."""
    export_logger = logging.getLogger("torch.export")
    kept = _KeptRecords()
    handlers, export_logger.handlers = export_logger.handlers, [kept]
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        logged = [record.exc_info[1] for record in kept.records if record.exc_info and record.exc_info[1] is not None]
        raise (logged[0] if logged and "warnings above" in str(exc) else exc) from None
    finally:
        export_logger.handlers = handlers
    for record in kept.records:
        logger.warning("%s: torch.export says: %s", path.name, record.getMessage())
    return program


def _exported_width(program: torch.export.ExportedProgram) -> int | None:
    shapes = _exported_input_shapes(program)
    if not shapes:
        return None
    first = shapes[0]
    return first[1] if len(first) == 2 else None


def _exported_input_shapes(program: torch.export.ExportedProgram) -> list[tuple[int | None, ...]]:
    """Each user input's shape, in order; None for a dynamic size."""
    user_inputs = set(program.graph_signature.user_inputs)
    return [
        tuple(int(size) if isinstance(size, int) else None for size in node.meta["val"].shape)
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs
    ]


def _exported_forward(program: torch.export.ExportedProgram) -> Callable[[torch.Tensor], Any]:
    """Call the program's graph directly with its weights bound.

    `program.module()` re-checks input constraints and re-flattens arguments on every call:
    ~150 µs for one row of a small MLP here, against ~30 µs for the bare graph. Programs with
    inputs other than weights and one tensor keep the checked path.
    """
    signature = program.graph_signature
    kinds = {spec.kind.name for spec in signature.input_specs}
    if not kinds <= {"PARAMETER", "BUFFER", "CONSTANT_TENSOR", "USER_INPUT"} or len(signature.user_inputs) != 1:
        return program.module()
    # Constants and non-persistent buffers live in `constants`, the rest in `state_dict`.
    bound = [
        (program.state_dict[spec.target] if spec.target in program.state_dict else program.constants[spec.target]).detach()
        for spec in signature.input_specs
        if spec.kind.name != "USER_INPUT"
    ]
    if any(spec.kind.name == "USER_INPUT" for spec in signature.input_specs[: len(bound)]):
        return program.module()  # the user input is not last: keep the general path
    graph = program.graph_module
    out_spec = program.call_spec.out_spec

    def forward(rows: torch.Tensor) -> Any:
        flat = graph(*bound, rows)
        return pytree.tree_unflatten(list(flat), out_spec) if out_spec is not None else flat

    width = _exported_width(program)
    device = bound[0].device if bound else torch.device("cpu")
    return _traced(forward, width, device) if width is not None else forward


class _Graph(torch.nn.Module):
    def __init__(self, forward: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.graph_forward = forward

    def forward(self, rows: torch.Tensor) -> Any:
        return self.graph_forward(rows)


def _traced(forward: Callable[[torch.Tensor], Any], width: int, device: torch.device) -> Callable[[torch.Tensor], Any]:
    """The graph recorded once more as TorchScript, which runs its ops in C++: a one-row call of
    the default example takes ~17 µs instead of ~31 µs (each aten op called from Python costs
    ~4 µs). Kept only if it gives the very same outputs as the graph for several batch sizes (a
    graph that reads its batch size would have it frozen by the trace); else the graph serves."""
    probes = [torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)).to(device) for rows in (1, 3, 17)]
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Graph(forward), probes[1], check_trace=False)
            same = all(_same_outputs(traced(probe), forward(probe)) for probe in probes)
    except Exception as exc:  # tracing is an optimisation: any failure keeps the graph
        logger.debug("serving the exported graph untraced (%s)", first_line(exc))
        return forward
    return traced if same else forward


def _same_outputs(got: Any, want: Any) -> bool:
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    return len(got_leaves) == len(want_leaves) and all(
        isinstance(g, torch.Tensor) and g.shape == w.shape and torch.equal(g, w) for g, w in zip(got_leaves, want_leaves, strict=True)
    )


def _open_bundle(bundle: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(bundle)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(bundle, "model", f"is not a readable zip ({exc})", "re-create the bundle with zip") from None


def _load_bundle(bundle: Path, device: str = "cpu", cache: TraceCache | None = None) -> Runtime:
    with _open_bundle(bundle) as archive:
        members = [n for n in _bundle_members(archive) if Path(n).suffix in BUNDLED_SUFFIXES]
        if len(members) != 1:
            found = ", ".join(members) or "none"
            raise ConfigError(
                bundle,
                "model",
                f"a bundle must hold exactly one .pt2, .pt or .onnx model (found: {found})",
                "zip one model file, optionally with schema.yaml",
            )
        data = archive.read(members[0])
    runtime = _load_bytes(bundle, Path(members[0]).suffix, data, device, cache)
    runtime.format = f"bundle/{runtime.format}"
    return runtime


def _load_onnx(path: Path, data: bytes) -> Runtime:
    """An ONNX graph run by onnxruntime on the CPU, one thread per call as torch is.

    A plain file loads from its path, so weights saved beside it (`model.onnx.data`, what
    torch.onnx.export writes by default) are found; a bundle's member loads from its bytes.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            path, "model", "an .onnx model needs onnxruntime, which is not installed", "install the onnx extra: pip install .[onnx]"
        ) from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = str(path) if path.suffix == ".onnx" else data
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if not inputs or any(i.type != "tensor(float)" for i in inputs):
        found = ", ".join(f"{i.name}: {i.type}" for i in inputs)
        raise ConfigError(
            path,
            "model",
            f"an ONNX policy takes float32 inputs: the rows [batch, size], then a recurrent policy's state (this one takes {found})",
            _SAVE_HINTS[".onnx"],
        )
    names, shape = [i.name for i in inputs], inputs[0].shape
    width = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
    state_shapes = tuple(tuple(size if isinstance(size, int) else None for size in i.shape[1:]) for i in inputs[1:])

    def forward(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {name: tensor.numpy() for name, tensor in zip(names, tensors, strict=True)}
        return tuple(torch.from_numpy(output) for output in session.run(None, feed))

    return Runtime(path=path, format="onnx", forward=forward, input_size=width, state_shapes=state_shapes)
