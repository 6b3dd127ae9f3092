"""How fast a distillation run goes, kept apart from what it computes.

Every switch here leaves the experiment unchanged (up to floating-point rounding), so none
of them belongs in the ``DistillationModule``'s experiment-defining arguments. In YAML::

    model:
      init_args:
        performance: {teacher_cache: memory, channels_last: auto, compile: student}
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError


@dataclass
class Performance:
    """Speed and memory switches of a ``DistillationModule``.

    Args:
        teacher_cache: reuse each teacher output per (sample, augmentation view): ``off``;
            ``memory`` (``kd_lightning.modules.teacher_cache``, needs ``data.augment_views``);
            ``disk`` (a top-k store under ``store_dir``,
            ``kd_lightning.modules.teacher_store``).
        cache_device: ``auto`` keeps the memory cache on the training device, ``cpu`` in
            host memory (for large feature maps).
        store_dir: directory of the disk store (``teacher_cache: disk``).
        store_topk: logits kept per sample in the disk store (0 = all classes).
        channels_last: run the convolutional networks (weights and inputs) in channels_last
            memory format. ``auto``: on for networks with 2-D convolutions, on every device
            (measured faster on CUDA and on the CPU, with the same results; see the docs'
            performance page); networks without convolutions are left alone.
        compile: ``torch.compile`` the ``student``, the ``teacher``s, ``both`` or ``none``
            (``nn.Module.compile``: state-dict keys are unchanged), with ``compile_kwargs``.
        check_finite: stop with a clear error when the loss becomes NaN/inf (one host sync
            per step).
        fold_teacher_bn: fold each frozen teacher's BatchNorms into the convolution (or
            linear layer) before them at build time (``kd_lightning.models.fold``): the same
            outputs to fp32 rounding, one pass less over every feature map. The teacher's
            fingerprint is taken before folding. ``false`` to debug with the network as built.
        teacher_precision: the precision of the teachers' forward: ``fp32``; ``bf16`` or
            ``fp16`` (autocast around the teachers only); ``auto``: bf16 where the device runs
            it fast (a CUDA device with bf16, a CPU with AVX512-BF16 or AMX,
            ``fast_bf16``), fp32 elsewhere. It never raises precision: under a mixed-precision
            trainer the teachers share the student's autocast as before unless this asks for
            a half type. Teacher outputs reach the heads in fp32 either way.
    """

    teacher_cache: Literal["off", "memory", "disk"] = "off"
    cache_device: Literal["auto", "cpu"] = "auto"
    store_dir: str | None = None
    store_topk: int = 0
    channels_last: bool | Literal["auto"] = "auto"
    compile: Literal["none", "student", "teacher", "both"] = "none"
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    check_finite: bool = True
    fold_teacher_bn: bool = True
    teacher_precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"

    def __post_init__(self) -> None:
        if self.teacher_cache == "disk" and not self.store_dir:
            raise ConfigError(
                "model.performance.store_dir", self.store_dir,
                "teacher_cache: disk needs a directory for the store (store_dir: runs/teacher_store)",
            )
        if self.teacher_precision not in TEACHER_DTYPES:
            raise ConfigError(
                "model.performance.teacher_precision", self.teacher_precision,
                f"use one of {sorted(TEACHER_DTYPES)}",
            )
        if self.store_topk < 0:
            raise ConfigError("model.performance.store_topk", self.store_topk, "use 0 (all classes) or k >= 1")

    def make_cache(self, num_classes: int) -> Any:
        """The teacher-output cache the module calls, or None."""
        if self.teacher_cache == "memory":
            from kd_lightning.modules.teacher_cache import TeacherCache

            return TeacherCache(self.cache_device)
        if self.teacher_cache == "disk":
            from kd_lightning.modules.teacher_store import TeacherStore

            return TeacherStore(
                self.store_dir, k=self.store_topk or num_classes,
                fields={"k": "model.performance.store_topk", "path": "model.performance.store_dir"},
            )
        return None

    def apply(self, model: nn.Module, role: Literal["student", "teacher"]) -> None:
        """channels_last and compile for one network, in place."""
        if self.channels_last is True or (self.channels_last == "auto" and _has_conv2d(model)):
            # weights now; inputs by a pre-hook, so every call site is covered
            model.to(memory_format=torch.channels_last)
            model.register_forward_pre_hook(_channels_last_input)
        if self.compile in (role, "both"):
            model.compile(**self.compile_kwargs)


#: teacher_precision → the autocast dtype around the teachers (None: no autocast of their own)
TEACHER_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16,
}


def teacher_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``teacher_precision`` asks for on ``device``, or None for none."""
    if precision == "auto" and not fast_bf16(device):
        return None
    return TEACHER_DTYPES[precision]


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively (so bf16 is faster than fp32, not an
    emulation): CUDA with bf16 support (Ampere and newer), or a CPU with AVX512-BF16 or
    AMX tiles (``cpu_bf16_flags``). Other devices (MPS, ...) answer False."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the emulation argument
            return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The CPU's bf16 compute flags (``avx512_bf16``, ``amx_bf16``) from ``cpuinfo``;
    empty where the file does not exist (macOS, Windows) or lists neither. The
    capability torch dispatches to must be AVX512 as well (``ATEN_CPU_CAPABILITY`` can
    lower it), or torch would not use those instructions."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability and "AMX" not in capability:
        return ()
    return tuple(f for f in ("avx512_bf16", "amx_bf16") if f in flags)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.ndim == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None
