"""Post-training int8 quantization for CPU inference, with ``torch.ao.quantization``.

``dynamic``
    int8 weights; activations are quantized on the fly, per batch. Only ``nn.Linear``
    layers change, no calibration data is needed. Best for linear-heavy models (MLPs,
    transformers); convolutions stay fp32.
``static``
    FX graph mode (``prepare_fx`` → calibration → ``convert_fx``): conv/linear + BN + ReLU
    are fused, observers record activation ranges on a few training batches, and the
    whole graph runs int8 kernels (fbgemm/x86 or qnnpack). Residual additions are handled
    by the graph rewrite, so CIFAR ResNets need no ``QuantStub``/``FloatFunctional`` edits.

torch 2.14 marks ``torch.ao.quantization`` as deprecated in favour of torchao's pt2e flow
but still ships it; its deprecation warnings are silenced here because they fire on every
call and say nothing about the user's configuration.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError

Backend = Literal["x86", "fbgemm", "qnnpack", "onednn"]


@dataclass
class QuantizeConfig:
    """Which post-training quantizations to run.

    Args:
        dynamic: dynamic int8 quantization of ``nn.Linear`` layers.
        static: static int8 quantization of the whole graph (FX), calibrated on
            ``calibration_batches`` training batches.
        backend: the int8 kernel library: ``x86``/``fbgemm`` for x86 servers and
            desktops, ``qnnpack`` for ARM/mobile.
        calibration_batches: training batches the static observers see.
    """

    dynamic: bool = True
    static: bool = True
    backend: Backend = "x86"
    calibration_batches: int = 16


@contextmanager
def quiet_ao() -> Iterator[None]:
    """Silence torch.ao's per-call deprecation notices (not the user's concern)."""
    with warnings.catch_warnings():
        for message in (
            r".*torch\.ao\.quantization is deprecated.*",
            r".*quant_min and quant_max.*",
            r".*torch\.quantize_per_tensor.*deprecated.*",
            r".*is deprecated.*(torch\.export|torch\.compile).*",
        ):
            warnings.filterwarnings("ignore", message=message)
        yield


def set_backend(backend: str) -> None:
    engines = torch.backends.quantized.supported_engines
    if backend not in engines:
        raise ConfigError(
            "quantize.backend", backend, f"this PyTorch build supports {[e for e in engines if e != 'none']}"
        )
    torch.backends.quantized.engine = backend


def quantize_dynamic(model: nn.Module, backend: str = "x86") -> nn.Module:
    """A dynamically quantized copy of ``model`` (int8 ``nn.Linear`` weights)."""
    set_backend(backend)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ConfigError(
            "quantize.dynamic", True,
            f"{getattr(model, 'kd_name', type(model).__name__)} has no nn.Linear layer to "
            "quantize dynamically; use quantize.static",
        )
    with quiet_ao():
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8
        )


def quantize_static(model: nn.Module, calibration: Iterable[Tensor], backend: str = "x86") -> nn.Module:
    """A statically quantized (FX graph mode) copy of ``model``, calibrated on ``calibration``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    set_backend(backend)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ConfigError("quantize.calibration_batches", 0, "give at least one calibration batch")
    model = copy.deepcopy(model).cpu().eval()
    name = getattr(model, "kd_name", type(model).__name__)
    with quiet_ao():
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping(backend), (first,))
        except Exception as err:  # torch.fx cannot trace data-dependent control flow
            raise ConfigError(
                "quantize.static", True,
                f"torch.fx cannot trace {name!r} ({type(err).__name__}: {err}); set "
                "quantize.static=false and use quantize.dynamic",
            ) from None
        with torch.no_grad():  # observers record activation ranges
            prepared(first)
            for x in batches:
                prepared(x)
        quantized = convert_fx(prepared)
    quantized.kd_name = name
    return quantized


def is_quantized(model: nn.Module) -> bool:
    prefixes = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    return any(type(m).__module__.startswith(prefixes) for m in model.modules())
