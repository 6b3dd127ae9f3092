"""DistillationModule: a trainable student taught by one or more frozen teachers.

The flow of one training step::

    batch ─► teacher(s) (inference_mode, eval) ─► TeacherOutput ─┐
          └► student (+ hooked features)        ─► ModelOutput  ─┴► Σ wᵢ(t)·headᵢ ─► loss

Teachers are deliberately *not* registered submodules: they never appear in
``parameters()`` (so never in the optimizer or DDP's gradient sync), never in
``state_dict()`` (so never in checkpoints), and ``LightningModule.train()`` cannot flip
them out of eval mode (``FrozenTeacherModule``, shared with the causal-LM distiller).
``_apply`` is extended so ``.to(device)``/dtype casts still reach them. They are rebuilt from their source (``TeacherSpec``) whenever the module is built:
on fit, on resume from ``ckpt_path`` and in ``load_from_checkpoint``; the checkpoint
stores each teacher's fingerprint so a changed teacher is detected on load.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd_lightning.errors import ConfigError
from kd_lightning.losses import CrossEntropy, KLDivergence, LossHead, ModelOutput, TeacherOutput
from kd_lightning.models import model_from_config
from kd_lightning.modules.features import FeatureTaps
from kd_lightning.modules.frozen_teacher import FrozenTeacherModule
from kd_lightning.modules.init_from_teacher import InitReport, InitStrategy, copy_from_teacher
from kd_lightning.modules.inputs import (
    batch_size,
    builder_inputs,
    check_input_shape,
    dummy_batch,
    model_inputs,
)
from kd_lightning.modules.metrics import agreement_metric, classifier_metrics
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import (
    TeacherSpec,
    build_teacher,
    check_teacher_vocabulary,
)
from kd_lightning.modules.teacher_cache import cache_stage, check_cache_data


class DistillationModule(FrozenTeacherModule):
    """Knowledge distillation with a configurable, weighted set of loss heads.

    Args:
        student: registered model name of the student.
        student_kwargs: extra builder arguments for the student.
        teacher: where the teacher comes from (``TeacherSpec``), or a list of them for
            a multi-teacher ensemble.
        heads: the loss terms; default ``[CrossEntropy(0.1), KLDivergence(0.9, T=4)]``,
            the RepDistiller/mdistiller KD recipe.
        num_classes: linked from the DataModule by the CLI.
        input_shape: (C, H, W) for images or (max_length,) for text; linked from the
            DataModule by the CLI.
        vocab_sizes: for text, the vocabulary size of each token-id batch key
            (``input_ids``; ``student_input_ids`` when the student tokenizes differently);
            linked from the DataModule. Networks read the batch as ``modules.inputs`` says.
        allow_teacher_change: resume a fit even if the teacher rebuilt from ``teacher``
            differs from the one the checkpoint was trained with (default: refuse).
        init_from_teacher: start the student from the (first) teacher's weights:
            ``matching`` copies tensors whose names and shapes match, ``every_kth`` also
            maps a shallower student's blocks to every k-th teacher block (DistilBERT).
            A resumed or loaded checkpoint overwrites this initialisation.
        performance: switches that change speed, not results (``Performance``): the
            teacher-output cache (memory or disk), channels_last, ``torch.compile``, the
            non-finite-loss check.
        optimizer, lr_scheduler: see ``BaseModule``; they see only student + adapters.

    Logs ``train/loss_step``/``train/loss_epoch`` (``train/loss`` for callbacks),
    ``train/loss_<head>`` per head (``BaseModule.log_train_step``), and for val/test
    ``acc`` (the student), ``teacher_acc``, ``agreement``, ``ece``, ``teacher_ece``
    and ``kl_teacher_student`` (KL(teacher ‖ student) at T=1). With several teachers the
    ``teacher_*`` metrics score the weighted ensemble and ``teacher<i>_acc``/``_ece`` each
    member.
    """

    monitor = "val/acc"
    prog_bar_metrics = ("student",)

    def __init__(
        self,
        student: str = "mlp_tiny",
        student_kwargs: dict[str, Any] | None = None,
        teacher: TeacherSpec | list[TeacherSpec] | None = None,
        heads: list[LossHead] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        vocab_sizes: dict[str, int] | None = None,
        allow_teacher_change: bool = False,
        init_from_teacher: InitStrategy = "none",
        performance: Performance | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        # allow_teacher_change is a per-launch decision: LightningCLI re-applies a checkpoint's
        # hparams on resume, which would otherwise reset it to the saved value
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "allow_teacher_change"])
        self.input_shape = check_input_shape(input_shape)
        self.num_classes = num_classes
        self.performance = performance = performance or Performance()
        self.check_finite = performance.check_finite
        self.allow_teacher_change = allow_teacher_change

        self.vocab_sizes = dict(vocab_sizes or {})
        self.student = model_from_config(
            student, num_classes, builder_inputs(self.input_shape, vocab_sizes, "student"),
            "model.student", student_kwargs,
        )
        specs = teacher if isinstance(teacher, list) else [teacher] if teacher else []
        if not specs:
            raise ConfigError("model.teacher", teacher, "give a teacher: {checkpoint: path/to.ckpt}")
        fields = ["model.teacher"] if len(specs) == 1 else [f"model.teacher[{i}]" for i in range(len(specs))]
        self.set_teachers([
            build_teacher(s, num_classes, builder_inputs(self.input_shape, vocab_sizes, "teacher"), f)
            for s, f in zip(specs, fields)
        ], [s.weight for s in specs])
        self.init_report: InitReport | None = None
        if init_from_teacher != "none":
            self.init_report = copy_from_teacher(self.student, self._teachers[0], init_from_teacher)

        self.heads = nn.ModuleList(
            heads if heads is not None else [CrossEntropy(0.1), KLDivergence(0.9, temperature=4.0)]
        )
        self._check_heads()
        teacher_taps = [
            [n for h in self.heads if h.teacher_index == i for n in h.teacher_layers]
            for i in range(len(self._teachers))
        ]
        self.teacher_precision = performance.teacher_precision
        if performance.fold_teacher_bn:  # before the taps' hooks, which must see the folds
            probe = dummy_batch(self.input_shape, self.vocab_sizes)
            self.fold_teachers(teacher_taps, [model_inputs(t, probe, "teacher") for t in self._teachers])
        self._student_taps = FeatureTaps(
            self.student, [n for h in self.heads for n in h.student_layers], "student_layers"
        )
        self._teacher_taps = [
            FeatureTaps(t, layers, "teacher_layers") for t, layers in zip(self._teachers, teacher_taps)
        ]
        self._build_heads()
        # read by torch's DistributedDataParallel (and Lightning's DDP strategy): buffers it
        # neither broadcasts nor syncs
        self._ddp_params_and_buffers_to_ignore = [
            f"heads.{i}.{name}" for i, h in enumerate(self.heads) for name in h.rank_consistent_buffers
        ]
        # after the dummy forward, so compilation sees real batches only
        #: what ``teacher_forward`` asks first: a ``TeacherCache``/``TeacherStore``, or None
        self.teacher_cache = performance.make_cache(num_classes)
        performance.apply(self.student, "student")
        for t in self._teachers:
            performance.apply(t, "teacher")

        self.train_metrics = classifier_metrics(num_classes, "train/")
        # kd-lightning DataModules report their unlabelled count; others may hold -1 labels
        self._mask_unlabelled = True
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
        batch = dummy_batch(self.input_shape, self.vocab_sizes)
        student = self._probe(self._student_taps, batch, "student", self.hparams.student)
        teachers = [
            self._probe(taps, batch, "teacher", getattr(taps.model, "kd_name", "teacher"), f"[{i}]")
            for i, taps in enumerate(self._teacher_taps)
        ]
        s_shapes = {k: v.shape for k, v in student.features.items()}
        for head in self.heads:
            t_shapes = {k: v.shape for k, v in teachers[head.teacher_index].features.items()}
            head.build(s_shapes, t_shapes)

    def _probe(self, taps: FeatureTaps, batch: dict[str, Tensor], role: str, name: str,
               suffix: str = "") -> ModelOutput:
        field = f"model.{role}{suffix}"
        was_training = taps.model.training
        taps.model.eval()
        try:
            out = taps(*model_inputs(taps.model, batch, role))
        except (RuntimeError, IndexError) as err:
            raise ConfigError(
                field, name,
                f"it cannot run on the data's inputs of shape {tuple(self.input_shape)} ({err}); "
                "pick a model built for this input size/channels (or vocabulary)",
            ) from None
        finally:
            nn.Module.train(taps.model, was_training)
        if out.logits.shape[-1] != self.num_classes:
            raise ConfigError(
                field, name, f"it outputs {out.logits.shape[-1]} classes but the data has {self.num_classes}"
            )
        return out

    def _eval_metrics(self, prefix: str) -> nn.ModuleDict:
        metrics = nn.ModuleDict({
            "student": classifier_metrics(self.num_classes, prefix),
            "teacher": classifier_metrics(self.num_classes, prefix, "teacher_"),
            "agreement": agreement_metric(self.num_classes),
            "kl_teacher_student": MeanMetric(),  # KL(teacher ‖ student) at T=1
            "loss": MeanMetric(),  # the student's CE
        })
        if len(self._teachers) > 1:  # "teacher_" is the ensemble; each member on its own too
            for i in range(len(self._teachers)):
                metrics[f"teacher{i}"] = classifier_metrics(self.num_classes, prefix, f"teacher{i}_")
        return metrics

    # -- teachers (frozen and fingerprinted by FrozenTeacherModule) ------------------------
    def teacher_forward(self, batch: dict[str, Tensor]) -> TeacherOutput:
        """All teachers on the batch, in eval mode and inference mode, under the same
        autocast as the student; from the teacher cache when ``teacher_cache`` is on."""
        stage = cache_stage(self._trainer) if self.teacher_cache is not None else None
        if stage is not None:
            members = self.teacher_cache(stage, batch, self._run_teachers)
        else:
            members = self._run_teachers(batch)
        return TeacherOutput(members, self.teacher_weights)

    def _run_teachers(self, batch: dict[str, Tensor]) -> list[ModelOutput]:
        # at teacher_precision; copied out of inference mode (so heads may save them for
        # backward), in fp32 when the teacher ran at a half type of its own
        with torch.inference_mode(), self.teacher_autocast():
            members = [taps(*model_inputs(taps.model, batch, "teacher")) for taps in self._teacher_taps]
        own = self.teacher_precision != "fp32"
        copy = (lambda t: t.float() if t.dtype != torch.float32 else t.clone()) if own else Tensor.clone
        return [
            ModelOutput(copy(m.logits), {k: copy(v) for k, v in m.features.items()})
            for m in members
        ]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        for i, t in enumerate(self._teachers):
            check_teacher_vocabulary(t, datamodule, f"model.teacher[{i}]")
        if self.teacher_cache is not None and stage == "fit":  # refuse before any step
            datamodule = getattr(self._trainer, "datamodule", None)
            self.teacher_cache.data_checked = check_cache_data(datamodule)
            bind = getattr(self.teacher_cache, "bind", None)  # the disk store checks its files
            if bind is not None:
                bind(datamodule, self.num_classes, self.teacher_fingerprints)

    def on_fit_start(self) -> None:
        # after DataModule.setup, so a kd-lightning DataModule knows its unlabelled count
        dm = getattr(self.trainer, "datamodule", None)
        self._mask_unlabelled = getattr(dm, "num_unlabelled", None) != 0

    # -- the loss -------------------------------------------------------------------------
    def forward(self, *inputs: Tensor) -> Tensor:
        return self.student(*inputs)

    def compute_loss(
        self, student: ModelOutput, teacher: TeacherOutput, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ wᵢ(epoch)·headᵢ in fp32, outside autocast: softmax at a temperature is
        precision-sensitive, and heads are cheap next to the forwards."""
        student = _fp32(student)
        members = [_fp32(m) for m in teacher.members]
        if any(a is not b for a, b in zip(members, teacher.members)):
            teacher = TeacherOutput(members, teacher.weights)
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        task: Tensor | None = None  # Σ of the task (label) heads, for split_backward
        # entering autocast(enabled=False) costs more than a small head: only when needed
        autocast = torch.is_autocast_enabled(self.device.type)
        with torch.autocast(self.device.type, enabled=False) if autocast else nullcontext():
            for head in self.heads:
                w = head.current_weight(self.current_epoch, self.global_step)
                term = head(student, teacher, batch)
                terms[head.name] = term.detach()
                if w != 0:
                    total = w * term if total is None else total + w * term
                    if self._split_backward is not None and getattr(head, "is_task_loss", False):
                        task = w * term if task is None else task + w * term
        if total is None:  # every weight is 0 now (a schedule's warm-up): a zero with a graph
            total = student.logits.sum() * 0.0
        if self._split_backward is not None:
            zero = student.logits.sum() * 0.0
            self._split_terms = (task if task is not None else zero,
                                 total - task if task is not None else total)
        return total, terms

    # -- optimizers that treat the task and distillation gradients apart (DOT) --------------
    #: the optimizer's ``split_backward(task_loss, distill_loss)``, when it has one
    _split_backward = None
    _split_terms: tuple[Tensor, Tensor] | None = None

    def on_train_start(self) -> None:
        super().on_train_start()
        optimizers = self.trainer.optimizers
        self._split_backward = getattr(optimizers[0], "split_backward", None) if optimizers else None

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Plain ``loss.backward()``, unless the optimizer takes the task (``is_task_loss``
        heads) and distillation losses apart: then it runs the backward passes itself."""
        if self._split_backward is None or self._split_terms is None:
            super().backward(loss, *args, **kwargs)
            return
        task, distill = self._split_terms
        self._split_terms = None
        self._split_backward(task, distill)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        teacher = self.teacher_forward(batch)
        student = self._student_taps(*model_inputs(self.student, batch, "student"))
        loss, terms = self.compute_loss(student, teacher, batch)
        if self.check_finite:
            self._assert_finite(loss, terms, batch_idx)
        self.log_train_step(loss, batch_size(batch), batch_idx, terms)
        if self._mask_unlabelled:
            labelled = batch["label"] >= 0
            if labelled.any():  # a host sync: only when the data may hold unlabelled samples
                self.train_metrics.update(student.logits.detach()[labelled], batch["label"][labelled])
                self._train_metrics_updated = True
        else:
            self.train_metrics.update(student.logits.detach(), batch["label"])
            self._train_metrics_updated = True
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
        s_logits = self.student(*model_inputs(self.student, batch, "student")).float()
        y, n = batch["label"], len(batch["label"])
        metrics["student"].update(s_logits, y)
        metrics["teacher"].update(teacher.probs(), y)
        metrics["agreement"].update(s_logits, teacher.argmax())
        kl = F.kl_div(F.log_softmax(s_logits, 1), teacher.log_probs(1.0), reduction="none", log_target=True)
        metrics["kl_teacher_student"].update(kl.sum(1))
        metrics["loss"].update(F.cross_entropy(s_logits, y), weight=n)
        if len(teacher.members) > 1:
            for i, member in enumerate(teacher.members):
                metrics[f"teacher{i}"].update(member.logits.float().softmax(1), y)
        self._eval_updated.add(stage)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.student(*model_inputs(self.student, batch, "student")).softmax(dim=1)


def _fp32(out: ModelOutput) -> ModelOutput:
    """``out`` in fp32: the same object when it already is (the common fp32 run)."""
    tensors = [out.logits, *out.features.values()]
    if all(t.dtype == torch.float32 for t in tensors):
        return out
    return ModelOutput(out.logits.float(), {k: v.float() for k, v in out.features.items()})
