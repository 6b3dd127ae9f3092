"""DistillationModule: a trainable student taught by one or more frozen teachers.

The flow of one training step::

    batch ─► teacher(s) (inference_mode, eval) ─► TeacherOutput ─┐
          └► student (+ hooked features)        ─► ModelOutput  ─┴► Σ wᵢ(t)·headᵢ ─► loss

Teachers are deliberately *not* registered submodules: they never appear in
``parameters()`` (so never in the optimizer or DDP's gradient sync), never in
``state_dict()`` (so never in checkpoints), and ``LightningModule.train()`` cannot flip
them out of eval mode. ``_apply`` is extended so ``.to(device)``/dtype casts still reach
them. They are rebuilt from their source (``TeacherSpec``) whenever the module is built:
on fit, on resume from ``ckpt_path`` and in ``load_from_checkpoint``; the checkpoint
stores each teacher's fingerprint so a changed teacher is detected on load.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd_lightning.errors import ConfigError
from kd_lightning.losses import CrossEntropy, KLDivergence, LossHead, ModelOutput, TeacherOutput
from kd_lightning.models import create_model
from kd_lightning.modules.base import BaseModule, check_input_shape
from kd_lightning.modules.features import FeatureTaps
from kd_lightning.modules.metrics import agreement_metric, classifier_metrics
from kd_lightning.modules.teacher import TeacherSpec, build_teacher, fingerprint


class DistillationModule(BaseModule):
    """Knowledge distillation with a configurable, weighted set of loss heads.

    Args:
        student: registered model name of the student.
        student_kwargs: extra builder arguments for the student.
        teacher: where the teacher comes from (``TeacherSpec``), or a list of them for
            a multi-teacher ensemble.
        heads: the loss terms; default ``[CrossEntropy(0.1), KLDivergence(0.9, T=4)]``,
            the RepDistiller/mdistiller KD recipe.
        num_classes: linked from the DataModule by the CLI.
        input_shape: (C, H, W), linked from the DataModule by the CLI.
        check_finite: stop with a clear error when the loss becomes NaN/inf.
        optimizer, lr_scheduler: see ``BaseModule``; they see only student + adapters.

    Logs ``train/loss``, ``train/loss_<head>`` per head, and for val/test
    ``student_acc``, ``teacher_acc``, ``agreement``, ``student_ece``, ``teacher_ece``
    and ``kl_teacher_student`` (KL(teacher ‖ student) at T=1).
    """

    monitor = "val/student_acc"

    def __init__(
        self,
        student: str = "mlp_tiny",
        student_kwargs: dict[str, Any] | None = None,
        teacher: TeacherSpec | list[TeacherSpec] | None = None,
        heads: list[LossHead] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        check_finite: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "heads"])
        self.input_shape = check_input_shape(input_shape)
        self.num_classes = num_classes
        self.check_finite = check_finite

        self.student = create_model(
            student, num_classes, self.input_shape[0], field="model.student", **(student_kwargs or {})
        )
        specs = teacher if isinstance(teacher, list) else [teacher] if teacher else []
        if not specs:
            raise ConfigError("model.teacher", teacher, "give a teacher: {checkpoint: path/to.ckpt}")
        fields = ["model.teacher"] if len(specs) == 1 else [f"model.teacher[{i}]" for i in range(len(specs))]
        self._teachers: list[nn.Module] = [
            build_teacher(s, num_classes, self.input_shape[0], f) for s, f in zip(specs, fields)
        ]
        self.teacher_weights = [float(s.weight) for s in specs]
        self.teacher_fingerprints = [fingerprint(t) for t in self._teachers]

        self.heads = nn.ModuleList(
            heads if heads is not None else [CrossEntropy(0.1), KLDivergence(0.9, temperature=4.0)]
        )
        self._check_heads()
        self._student_taps = FeatureTaps(
            self.student, [n for h in self.heads for n in h.student_layers], "student_layers"
        )
        self._teacher_taps = [
            FeatureTaps(t, [n for h in self.heads if h.teacher_index == i for n in h.teacher_layers],
                        "teacher_layers")
            for i, t in enumerate(self._teachers)
        ]
        self._build_heads()

        self.train_metrics = classifier_metrics(num_classes, "train/", "student_")
        self.val_metrics = self._eval_metrics("val/")
        self.test_metrics = self._eval_metrics("test/")

    # -- construction-time checks ---------------------------------------------------------
    def _check_heads(self) -> None:
        if len(self.heads) == 0:
            raise ConfigError("model.heads", [], "give at least one loss head")
        if all(h.weight == 0 for h in self.heads):
            raise ConfigError(
                "model.heads", [h.weight for h in self.heads], "all head weights are 0: give one a weight > 0"
            )
        names = [h.name for h in self.heads]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError("model.heads", names, f"head names {sorted(dupes)} repeat: set a distinct `name`")
        for h in self.heads:
            if h.teacher_index >= len(self._teachers):
                raise ConfigError(
                    f"model.heads.{h.name}.teacher_index", h.teacher_index,
                    f"there are only {len(self._teachers)} teacher(s)",
                )

    @torch.no_grad()
    def _build_heads(self) -> None:
        """Dummy forward: checks shapes/classes, then sizes each head's adapters."""
        x = torch.zeros(2, *self.input_shape)
        student = self._probe(self._student_taps, x, "model.student", self.hparams.student)
        teachers = [
            self._probe(taps, x, f"model.teacher[{i}]", getattr(taps.model, "kd_name", "teacher"))
            for i, taps in enumerate(self._teacher_taps)
        ]
        s_shapes = {k: v.shape for k, v in student.features.items()}
        for head in self.heads:
            t_shapes = {k: v.shape for k, v in teachers[head.teacher_index].features.items()}
            head.build(s_shapes, t_shapes)

    def _probe(self, taps: FeatureTaps, x: Tensor, field: str, name: str) -> ModelOutput:
        was_training = taps.model.training
        taps.model.eval()
        try:
            out = taps(x)
        except RuntimeError as err:
            raise ConfigError(
                field, name,
                f"it cannot run on the data's inputs of shape {tuple(self.input_shape)} ({err}); "
                "pick a model built for this input size/channels",
            ) from None
        finally:
            nn.Module.train(taps.model, was_training)
        if out.logits.shape[-1] != self.num_classes:
            raise ConfigError(
                field, name, f"it outputs {out.logits.shape[-1]} classes but the data has {self.num_classes}"
            )
        return out

    def _eval_metrics(self, prefix: str) -> nn.ModuleDict:
        return nn.ModuleDict({
            "student": classifier_metrics(self.num_classes, prefix, "student_"),
            "teacher": classifier_metrics(self.num_classes, prefix, "teacher_"),
            "agreement": agreement_metric(self.num_classes),
            "kl": MeanMetric(),
        })

    # -- teachers -------------------------------------------------------------------------
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

    def teacher_forward(self, batch: dict[str, Tensor]) -> TeacherOutput:
        """All teachers on the batch, in eval mode and inference mode.

        Outputs are cloned out of inference mode so heads may save them for backward.
        """
        x = batch["image"]
        with torch.inference_mode():
            members = [taps(x) for taps in self._teacher_taps]
        members = [
            ModelOutput(m.logits.clone(), {k: v.clone() for k, v in m.features.items()})
            for m in members
        ]
        return TeacherOutput(members, self.teacher_weights)

    # -- the loss -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def compute_loss(
        self, student: ModelOutput, teacher: TeacherOutput, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ wᵢ(epoch)·headᵢ in fp32, outside autocast: softmax at a temperature is
        precision-sensitive, and heads are cheap next to the forwards."""
        student = _fp32(student)
        teacher = TeacherOutput([_fp32(m) for m in teacher.members], teacher.weights)
        terms: dict[str, Tensor] = {}
        total = student.logits.new_zeros(())
        with torch.autocast(self.device.type, enabled=False):
            for head in self.heads:
                w = head.current_weight(self.current_epoch, self.global_step)
                term = head(student, teacher, batch)
                terms[head.name] = term.detach()
                if w != 0:
                    total = total + w * term
        return total, terms

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        teacher = self.teacher_forward(batch)
        student = self._student_taps(batch["image"])
        loss, terms = self.compute_loss(student, teacher, batch)
        if self.check_finite:
            self._assert_finite(loss, terms, batch_idx)
        n = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for name, term in terms.items():
            self.log(f"train/loss_{name}", term, on_step=False, on_epoch=True, batch_size=n)
        labelled = batch["label"] >= 0
        if labelled.any():
            self.train_metrics.update(student.logits.detach()[labelled], batch["label"][labelled])
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _assert_finite(self, loss: Tensor, terms: dict[str, Tensor], batch_idx: int) -> None:
        if torch.isfinite(loss):
            return
        bad = [n for n, t in terms.items() if not torch.isfinite(t)] or ["(weighted sum)"]
        raise FloatingPointError(
            f"non-finite loss {loss.item()} at epoch {self.current_epoch}, global step "
            f"{self.global_step} (batch {batch_idx}), in loss term(s) {bad}. "
            "Lower the learning rate or check the head's inputs; checkpoints already saved are intact."
        )

    def _eval_step(self, batch: dict[str, Tensor], stage: str, metrics: nn.ModuleDict) -> None:
        teacher = self.teacher_forward(batch)
        s_logits = self.student(batch["image"]).float()
        y, n = batch["label"], len(batch["label"])
        metrics["student"].update(s_logits, y)
        metrics["teacher"].update(teacher.probs(), y)
        metrics["agreement"].update(s_logits, teacher.argmax())
        kl = F.kl_div(F.log_softmax(s_logits, 1), teacher.log_probs(1.0), reduction="none", log_target=True)
        metrics["kl"].update(kl.sum(1))
        self.log(f"{stage}/loss", F.cross_entropy(s_logits, y), batch_size=n)
        self.log_dict(metrics["student"], prog_bar=stage == "val", batch_size=n)
        self.log_dict(metrics["teacher"], batch_size=n)
        self.log(f"{stage}/agreement", metrics["agreement"], batch_size=n)
        self.log(f"{stage}/kl_teacher_student", metrics["kl"], batch_size=n)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.student(batch["image"]).softmax(dim=1)

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kd_teacher_fingerprints"] = self.teacher_fingerprints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("kd_teacher_fingerprints")
        if saved is not None and saved != self.teacher_fingerprints:
            warnings.warn(
                "the teacher rebuilt from model.teacher differs from the one this checkpoint was "
                "trained with (fingerprints differ): resuming continues against a different teacher",
                stacklevel=2,
            )


def _fp32(out: ModelOutput) -> ModelOutput:
    return ModelOutput(out.logits.float(), {k: v.float() for k, v in out.features.items()})

