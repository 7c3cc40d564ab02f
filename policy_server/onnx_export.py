"""A policy's `.pt2` or `.pt` model → one `.onnx` file with a dynamic batch, checked against its source.

Two exporters, because each reads one of the formats: torch's ONNX exporter (torch.export-based,
needs onnxscript) takes the ExportedProgram of a `.pt2` as it is; only the older TorchScript-based
exporter reads a TorchScript `.pt`. Both write the weights inside the file.
"""

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from policy_server.errors import ConfigError, first_line
from policy_server.runtimes import load_runtime

CHECK_ROWS = 16
TOLERANCE = 1e-5  # float32 kernels differ in summation order; a wrong export is off by far more


def export_onnx(source: Path, target: Path, input_size: int) -> float:
    """Write `source` (.pt2 or .pt) as ONNX to `target`; return the largest difference of their outputs."""
    if source.suffix not in (".pt2", ".pt"):
        raise ConfigError(
            source,
            "model",
            f"export_onnx converts .pt2 and .pt models, not {source.suffix}",
            "point model.path in schema.yaml at the .pt2 or .pt model",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="no signature found for <torch.ScriptMethod")  # TorchScript has none to read
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed", per operator
        try:
            if source.suffix == ".pt2":
                torch.onnx.export(torch.export.load(source), f=target, dynamo=True, external_data=False, verbose=False)
            else:
                _export_torchscript(torch.jit.load(source, map_location="cpu"), target, input_size)
        except ImportError as exc:
            raise ConfigError(
                source,
                "model",
                f"exporting to ONNX needs {exc.name}, which is not installed",
                "install the onnx extra: pip install .[onnx]",
            ) from None
        except Exception as exc:  # the exporters raise many kinds; the user needs the first line
            raise ConfigError(source, "model", f"does not export to ONNX ({first_line(exc)})", "keep serving the torch model") from None
    return _largest_difference(source, target, input_size)


def _export_torchscript(module: torch.jit.ScriptModule, target: Path, input_size: int) -> None:
    example = torch.zeros(2, input_size)
    outputs = module(example)
    count = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
    output_names = [f"output_{i}" for i in range(count)]
    torch.onnx.export(
        module,
        (example,),
        target,
        dynamo=False,
        input_names=["obs"],
        output_names=output_names,
        dynamic_axes={name: {0: "batch"} for name in ["obs", *output_names]},
    )


def _largest_difference(source: Path, target: Path, input_size: int) -> float:
    """Run both models on the same random rows; refuse an export whose outputs differ."""
    rows = np.random.default_rng(0).normal(size=(CHECK_ROWS, input_size)).astype(np.float32)
    expected, exported = load_runtime(source)(rows), load_runtime(target)(rows)
    if [e.shape for e in expected] != [x.shape for x in exported]:
        shapes = f"{[e.shape for e in expected]} vs {[x.shape for x in exported]}"
        raise ConfigError(
            target, "model", f"the ONNX model's outputs have other shapes than {source.name}'s ({shapes})", "keep serving the torch model"
        )
    difference = max(float(np.max(np.abs(e - x))) for e, x in zip(expected, exported, strict=True))
    scale = max(1.0, max(float(np.max(np.abs(e))) for e in expected))
    if not difference <= TOLERANCE * scale:
        raise ConfigError(
            target, "model", f"the ONNX model's outputs differ from {source.name}'s by {difference:.3g}", "keep serving the torch model"
        )
    return difference
