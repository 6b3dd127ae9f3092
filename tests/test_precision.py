"""Mixed precision: teacher and student under the same autocast, KD loss terms in fp32."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from kd_lightning.cli import main
from kd_lightning.data import BundledMNISTDataModule
from kd_lightning.losses import CrossEntropy, KLDivergence, LossHead, ModelOutput, TeacherOutput
from kd_lightning.modules import DistillationModule
from kd_lightning.modules.teacher import TeacherSpec
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


class Probe(LossHead):
    """Records what a head sees: input dtypes and whether autocast is still on."""

    default_name = "probe"

    def __init__(self) -> None:
        super().__init__(weight=0.0)
        self.seen: list[tuple[torch.dtype, torch.dtype, bool]] = []

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch) -> Tensor:
        self.seen.append((student.logits.dtype, teacher.logits.dtype, torch.is_autocast_enabled("cpu")))
        return student.logits.new_zeros(())


class Recording(DistillationModule):
    """Records the dtypes going into and coming out of ``compute_loss``."""

    def compute_loss(self, student, teacher, batch):
        total, terms = super().compute_loss(student, teacher, batch)
        self.record = {
            "student": student.logits.dtype,
            "teacher": teacher.members[0].logits.dtype,
            "total": total.dtype,
            "terms": {name: t.dtype for name, t in terms.items()},
        }
        return total, terms


def test_bf16_mixed_teacher_under_autocast_and_loss_in_fp32(mnist_teacher_ckpt):
    probe = Probe()
    module = Recording(
        student="mlp_tiny", teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)),
        heads=[CrossEntropy(0.1), KLDivergence(0.9, temperature=4.0), probe],
    )
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_epochs=1, limit_train_batches=2,
        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, BundledMNISTDataModule(batch_size=32, eval_batch_size=64))
    # inside the forward, both networks ran under the same bf16 autocast ...
    assert module.record["student"] == torch.bfloat16
    assert module.record["teacher"] == torch.bfloat16
    # ... but every head saw fp32 logits with autocast off, and the loss is fp32
    assert probe.seen and all(s == (torch.float32, torch.float32, False) for s in probe.seen)
    assert module.record["total"] == torch.float32
    assert set(module.record["terms"].values()) == {torch.float32}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["train/loss"].dtype == torch.float32


def test_bf16_mixed_debug_fit_from_the_cli(mnist_teacher_ckpt, tmp_path):
    cli = main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), *DEBUG_TRAINER,
        "--trainer.precision=bf16-mixed", f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
        *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--test_after_fit=false",
    ])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.precision == "bf16-mixed"
    for key in ("train/loss", "val/acc", "val/teacher_acc", "val/kl_teacher_student"):
        assert torch.isfinite(metrics[key]), key
    # the checkpoint keeps fp32 weights (mixed precision never casts the parameters)
    ckpt = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=False)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
