"""What every distiller does with its frozen teachers, whatever the modality.

Teachers are deliberately *not* registered submodules: they never appear in
``parameters()`` (so never in the optimizer or DDP's gradient sync), never in
``state_dict()`` (so never in checkpoints), and ``LightningModule.train()`` cannot flip
them out of eval mode (``teacher.freeze``). ``_apply`` is extended so ``.to(device)`` and
dtype casts still reach them. Subclasses rebuild them from their source (``TeacherSpec``)
whenever the module is built — on fit, on resume from ``ckpt_path`` and in
``load_from_checkpoint`` — and hand them to ``set_teachers``; the checkpoint stores each
teacher's fingerprint so that a changed teacher is refused on resume.

``DistillationModule`` (classifiers) and ``LMDistillationModule`` (causal LMs) both
derive from ``FrozenTeacherModule``. Two speed switches act here, after the fingerprint is
taken (so checkpoints and resume do not see them): ``fold_teachers`` folds BatchNorm into
the layer before it, and ``teacher_autocast`` runs the teachers at ``teacher_precision``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.models.fold import FoldReport, fold_batchnorm
from kd_lightning.modules.base import BaseModule
from kd_lightning.modules.performance import teacher_dtype
from kd_lightning.modules.teacher import fingerprint


class FrozenTeacherModule(BaseModule):
    """A ``BaseModule`` with frozen, unregistered teachers that follow device/dtype moves
    and are fingerprinted into every checkpoint.

    Subclasses set ``allow_teacher_change`` and call ``set_teachers`` in ``__init__``."""

    allow_teacher_change: bool = False
    #: ``Performance.teacher_precision`` (subclasses with a ``Performance`` set it from there)
    teacher_precision: str = "fp32"

    def set_teachers(self, teachers: list[nn.Module], weights: list[float]) -> None:
        self._teachers: list[nn.Module] = list(teachers)
        self.teacher_weights = [float(w) for w in weights]
        # of the weights as loaded, before any fold: what checkpoints and resume compare
        self.teacher_fingerprints = [fingerprint(t) for t in self._teachers]
        self.fold_reports: list[FoldReport] = [FoldReport() for _ in self._teachers]

    def fold_teachers(
        self, taps: Sequence[Sequence[str]], example_inputs: Sequence[Sequence[Tensor]]
    ) -> None:
        """Fold each teacher's BatchNorms in place (``kd_lightning.models.fold``), keeping
        the values its feature taps (``taps[i]``) read; checked on ``example_inputs[i]``.
        Call before the taps' hooks are registered."""
        self.fold_reports = [
            fold_batchnorm(t, inputs, keep)
            for t, keep, inputs in zip(self._teachers, taps, example_inputs)
        ]

    def teacher_autocast(self) -> AbstractContextManager:
        """The autocast the teachers run under: ``teacher_precision`` on this device (none
        for fp32, so a mixed-precision trainer's autocast still applies)."""
        dtype = teacher_dtype(self.teacher_precision, self.device)
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    @property
    def teacher(self) -> nn.Module:
        return self._teachers[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for t in self.__dict__.get("_teachers", []):
            t._apply(fn, *args, **kwargs)
        return self

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kd_teacher_fingerprints"] = self.teacher_fingerprints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("kd_teacher_fingerprints")
        if saved is None or saved == self.teacher_fingerprints:
            return
        sources = [teacher_source(s) for s in teacher_specs(self.hparams.get("teacher"))]
        # Resuming a fit against another teacher silently changes the experiment: refuse.
        # Loading for evaluation (no trainer, or validate/test) only warns: the student's
        # own metrics do not depend on the teacher.
        if (
            self._trainer is not None
            and self.trainer.state.fn == "fit"
            and not self.allow_teacher_change
        ):
            raise ConfigError(
                "model.teacher",
                sources,
                "it is not the teacher this checkpoint was trained with (weight fingerprints "
                "differ): restore the original teacher file, or set "
                "model.allow_teacher_change=true to continue against this one",
            )
        warnings.warn(
            f"the teacher rebuilt from model.teacher ({sources}) differs from the one this "
            "checkpoint was trained with (fingerprints differ)",
            stacklevel=2,
        )


def teacher_specs(teacher: Any) -> list[Any]:
    """``hparams.teacher`` as a list of specs (a single spec, a list, or None)."""
    if teacher is None:
        return []
    return list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]


def teacher_source(spec: Any) -> Any:
    """Where a teacher spec (a TeacherSpec, or a dict once round-tripped) loads from."""
    get = spec.get if isinstance(spec, dict) else (lambda key: getattr(spec, key, None))
    return get("checkpoint") or get("weights") or get("model")
