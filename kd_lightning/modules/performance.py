"""How fast a distillation run goes, kept apart from what it computes.

Every switch here leaves the experiment unchanged (up to floating-point rounding), so none
of them belongs in the ``DistillationModule``'s experiment-defining arguments. In YAML::

    model:
      init_args:
        performance: {teacher_cache: memory, channels_last: auto, compile: student}
"""

from __future__ import annotations

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
    """

    teacher_cache: Literal["off", "memory", "disk"] = "off"
    cache_device: Literal["auto", "cpu"] = "auto"
    store_dir: str | None = None
    store_topk: int = 0
    channels_last: bool | Literal["auto"] = "auto"
    compile: Literal["none", "student", "teacher", "both"] = "none"
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.teacher_cache == "disk" and not self.store_dir:
            raise ConfigError(
                "model.performance.store_dir", self.store_dir,
                "teacher_cache: disk needs a directory for the store (store_dir: runs/teacher_store)",
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


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.ndim == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None
