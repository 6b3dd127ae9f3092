"""Numerical faults: a NaN loss stops the fit with a message naming the step and the loss
term, and the last good checkpoint is left intact (same bytes, loadable)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.callbacks import KDModelCheckpoint
from kd_lightning.data import BundledMNISTDataModule
from kd_lightning.losses import CrossEntropy, LossHead, ModelOutput, TeacherOutput
from kd_lightning.modules import DistillationModule, TeacherSpec


class NaNAtCall(LossHead):
    """Logit matching that returns NaN on its ``nan_at``-th training call (0-based), as a
    diverging loss would."""

    default_name = "unstable"

    def __init__(self, weight: float = 1.0, nan_at: int = 3, **kwargs) -> None:
        super().__init__(weight, **kwargs)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: dict[str, Tensor]) -> Tensor:
        loss = F.mse_loss(student.logits, teacher.logits)
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.nan_at:
                return loss * float("nan")
        return loss


class FingerprintLast(L.Callback):
    """Before every training batch, the SHA-256 of ``last.ckpt`` as it is on disk."""

    def __init__(self, path: Path) -> None:
        self.path, self.digest = path, None

    def on_train_batch_start(self, *args) -> None:
        if self.path.exists():
            self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()


def test_nan_loss_stops_with_step_and_term_and_keeps_last_checkpoint(tmp_path, mnist_teacher_ckpt):
    model = DistillationModule(
        student="mlp_tiny", teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)),
        heads=[CrossEntropy(1.0), NaNAtCall(0.5, nan_at=3)],
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    watch = FingerprintLast(last)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=8, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[KDModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1), watch],
    )
    with pytest.raises(FloatingPointError, match=r"global step 3 \(batch 3\).*\['unstable'\]"):
        trainer.fit(model, datamodule=BundledMNISTDataModule(batch_size=32))

    assert watch.digest is not None
    assert hashlib.sha256(last.read_bytes()).hexdigest() == watch.digest  # untouched
    good = torch.load(last, map_location="cpu", weights_only=False)
    assert good["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    # and it resumes: the student weights load back into a fresh module
    fresh = DistillationModule(
        student="mlp_tiny", teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)),
        heads=[CrossEntropy(1.0), NaNAtCall(0.5, nan_at=10**6)],
    )
    fresh.load_state_dict(good["state_dict"])


def test_inf_in_the_weighted_sum_is_named_too(mnist_teacher_ckpt):
    model = DistillationModule(student="mlp_tiny", teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)))
    terms = {"ce": torch.tensor(1.0), "kd": torch.tensor(float("inf"))}
    with pytest.raises(FloatingPointError, match=r"non-finite loss inf.*\['kd'\]"):
        model._assert_finite(torch.tensor(float("inf")), terms, batch_idx=5)


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """KDModelCheckpoint installs AtomicCheckpointIO: write beside the target, fsync, rename."""
    from kd_lightning.callbacks.checkpoint import AtomicCheckpointIO

    io, target = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    before = target.read_bytes()

    def dies_midway(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temp file left
    monkeypatch.undo()
    assert torch.load(target, weights_only=False)["step"] == 1
