"""Deployment artifacts, each checked against the PyTorch model it came from.

* ONNX (``torch.onnx.export``, the torch.export-based exporter, dynamic batch size), run
  back with onnxruntime on CPU;
* ``torch.export`` programs (``.pt2``), loaded back with ``torch.export.load``;
* TorchScript (``torch.jit.trace``) for the int8 model: torch.ao's quantized modules hold
  packed parameters that neither torch.export nor ONNX accept, and TorchScript is the
  format in which torch.ao int8 models are deployed.

Every check runs the artifact and the source model on the same real inputs (several
batch sizes, so the dynamic batch dimension is exercised) and compares outputs with
``allclose(atol, rtol)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_lightning.compress.quantize import quiet_ao


@dataclass
class ExportConfig:
    """Which artifacts to write and how closely they must match PyTorch.

    Args:
        onnx: export the final fp32 student to ONNX and check it with onnxruntime.
        torch_export: save the final fp32 student as a ``torch.export`` program (``.pt2``).
        torchscript_int8: save the static int8 student as TorchScript.
        opset: ONNX opset (default: the exporter's).
        atol, rtol: tolerance of the output checks (fp32 artifacts).
        fail_on_mismatch: raise when a check fails (otherwise only the report says so).
    """

    onnx: bool = True
    torch_export: bool = True
    torchscript_int8: bool = True
    opset: int | None = None
    atol: float = 1e-4
    rtol: float = 1e-4
    fail_on_mismatch: bool = True


@dataclass
class ExportCheck:
    """One exported artifact and how far its outputs are from the source model's."""

    model: str
    format: str
    path: str
    size_mb: float
    max_abs_diff: float
    ok: bool


def export_onnx(model: nn.Module, example: Tensor, path: Path, opset: int | None = None) -> Path:
    """ONNX with a dynamic batch dimension (input ``image``, output ``logits``), as one
    self-contained file (weights inside: fine below protobuf's 2 GB limit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"opset_version": opset} if opset else {}
    torch.onnx.export(
        model.eval(), (example,), str(path), input_names=["image"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
        verbose=False, report=False, **kwargs,
    )
    return path


def onnx_runner(path: Path) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def export_program(model: nn.Module, example: Tensor, path: Path) -> Path:
    """A ``torch.export`` program with a dynamic batch dimension, saved as ``.pt2``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(
        model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(path))
    return path


def program_runner(path: Path) -> Callable[[Tensor], Tensor]:
    module = torch.export.load(str(path)).module()
    return lambda x: module(x)


def export_torchscript(model: nn.Module, example: Tensor, path: Path) -> Path:
    """A traced TorchScript module (the deployment format of torch.ao int8 models)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_ao(), warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        traced = torch.jit.trace(model.eval(), example)
        torch.jit.save(traced, str(path))
    return path


def torchscript_runner(path: Path) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        module = torch.jit.load(str(path))
    return lambda x: module(x)


def compare(
    runner: Callable[[Tensor], Tensor], model: nn.Module, inputs: Sequence[Tensor],
    atol: float, rtol: float,
) -> tuple[float, bool]:
    """Max |artifact − model| over ``inputs``, and whether every output is allclose."""
    worst, ok = 0.0, True
    with torch.no_grad(), quiet_ao():
        for x in inputs:
            ref, out = model(x).float(), runner(x).float()
            if out.shape != ref.shape:
                return float("inf"), False
            worst = max(worst, float((out - ref).abs().max()))
            ok = ok and torch.allclose(out, ref, atol=atol, rtol=rtol)
    return worst, ok
