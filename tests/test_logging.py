"""What the modules log: the train step loss reaches loggers and the progress bar exactly
when Lightning shows it, train epoch means are batch-weighted means of every step, and
val/test metrics are computed once per epoch over every sample."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from kd_lightning.modules import ClassifierModule, DistillationModule, TeacherSpec

SIZES = [8, 8, 8, 8, 3]  # a short last batch, so a plain mean of steps would be wrong


class Batches:
    """In-memory training batches of uneven size (an iterable, not a list of loaders)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [
            {"image": torch.randn(n, 1, 28, 28, generator=g), "label": torch.randint(0, 10, (n,), generator=g)}
            for n in SIZES
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def distiller() -> DistillationModule:
    return DistillationModule(student="mlp_tiny", teacher=TeacherSpec(model="lenet5", allow_untrained=True))


def classifier() -> ClassifierModule:
    return ClassifierModule(model="mlp_tiny")


def fit(module, tmp_path, **trainer_kwargs) -> tuple[L.Trainer, StepLosses]:
    losses = StepLosses()
    kwargs = dict(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        logger=CSVLogger(tmp_path, name="log", version=0), log_every_n_steps=2,
    )
    callbacks = [losses, *trainer_kwargs.pop("callbacks", [])]
    trainer = L.Trainer(**{**kwargs, **trainer_kwargs}, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=Batches())
    return trainer, losses


def read_csv(tmp_path) -> list[dict[str, str]]:
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def weighted_mean(values: list[float]) -> float:
    return sum(v * n for v, n in zip(values, SIZES)) / sum(SIZES)


@pytest.mark.parametrize("make", [distiller, classifier], ids=["distillation", "classifier"])
def test_step_loss_every_n_steps_and_weighted_epoch_mean(make, tmp_path):
    trainer, steps = fit(make(), tmp_path)
    rows = read_csv(tmp_path)
    logged = [(int(r["step"]), float(r["train/loss_step"])) for r in rows if r.get("train/loss_step")]
    # log_every_n_steps=2: Lightning writes steps 2 and 4 (0-based rows 1 and 3)
    assert [s for s, _ in logged] == [1, 3]
    assert [v for _, v in logged] == pytest.approx([steps.losses[1], steps.losses[3]], rel=1e-6)

    (epoch_row,) = [r for r in rows if r.get("train/loss_epoch")]
    assert float(epoch_row["train/loss_epoch"]) == pytest.approx(weighted_mean(steps.losses), rel=1e-5)
    # callbacks (checkpoint monitors, early stopping) see the epoch mean as train/loss
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(weighted_mean(steps.losses), rel=1e-5)
    assert "train/loss" not in epoch_row  # loggers get it once, as train/loss_epoch
    metric = "train/acc" if make is distiller else "train/acc"
    assert 0.0 <= float(epoch_row[metric]) <= 1.0


def test_head_terms_are_weighted_means_that_sum_to_the_loss(tmp_path):
    # default heads 0.1·CE + 0.9·KD: means are linear, so the epoch means must add up
    fit(distiller(), tmp_path)
    (row,) = [r for r in read_csv(tmp_path) if r.get("train/loss_epoch")]
    total = 0.1 * float(row["train/loss_ce"]) + 0.9 * float(row["train/loss_kd"])
    assert float(row["train/loss_epoch"]) == pytest.approx(total, rel=1e-5)


def test_progress_bar_shows_step_loss_at_its_refresh_rate(tmp_path):
    bar = TQDMProgressBar(refresh_rate=2)
    losses = StepLosses()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_model_summary=False, logger=False,
        callbacks=[bar, losses],
    )
    trainer.fit(distiller(), train_dataloaders=Batches())
    # refreshed after batches 2, 4 and the last one (5): it shows the last batch's loss
    assert float(trainer.progress_bar_metrics["train/loss_step"]) == pytest.approx(losses.losses[-1], rel=1e-6)


def test_no_logger_and_no_bar_logs_no_step_values(tmp_path):
    trainer, steps = fit(distiller(), tmp_path, logger=False)
    assert "train/loss_step" not in trainer.callback_metrics
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(weighted_mean(steps.losses), rel=1e-5)


@pytest.mark.parametrize("make", [distiller, classifier], ids=["distillation", "classifier"])
def test_eval_metrics_are_logged_once_per_epoch_over_all_batches(make, tmp_path):
    module = make()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (got,) = trainer.validate(module, dataloaders=Batches())
    batches = Batches().batches
    with torch.no_grad():
        logits = torch.cat([module(b["image"]) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    acc = (logits.argmax(1) == labels).float().mean().item()
    assert got["val/acc"] == pytest.approx(acc, abs=1e-6)  # one name in both modules
    # the CE over all samples, not a plain mean of per-batch means (the last batch is short)
    assert got["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    if make is distiller:
        with torch.no_grad():
            t_logits = torch.cat([module.teacher(b["image"]) for b in batches])
        agreement = (logits.argmax(1) == t_logits.argmax(1)).float().mean().item()
        assert got["val/agreement"] == pytest.approx(agreement, abs=1e-6)
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(t_logits, 1), reduction="batchmean", log_target=True)
        assert got["val/kl_teacher_student"] == pytest.approx(kl.item(), rel=1e-4)
    # metrics were reset: a second pass gives the same values, not a running mix
    (again,) = trainer.validate(module, dataloaders=Batches())
    assert again == pytest.approx(got)


def test_only_a_mid_epoch_checkpoint_carries_the_running_epoch(tmp_path):
    """The epoch's sums and train-metric states go into mid-epoch checkpoints (for an exact
    resume, see test_reliability_resume); a checkpoint at the epoch's end has none, so the
    next epoch cannot inherit them."""

    class SaveAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            trainer.save_checkpoint(tmp_path / "end.ckpt")

    fit(distiller(), tmp_path, logger=False, callbacks=[SaveAt()])
    mid = torch.load(tmp_path / "mid.ckpt", weights_only=False)["kd_train_epoch"]
    assert mid["count"] == SIZES[0] + SIZES[1] and mid["names"] == ["", "ce", "kd"]
    assert set(mid["metrics"]) == {"train/acc", "train/ece"}
    assert "kd_train_epoch" not in torch.load(tmp_path / "end.ckpt", weights_only=False)


def test_weights_loaded_then_trained_afresh_do_not_inherit_the_running_epoch(tmp_path):
    class SaveMid(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    fit(distiller(), tmp_path, logger=False, callbacks=[SaveMid()])
    # a new fit (no ckpt_path) of weights loaded from a mid-epoch checkpoint
    module = DistillationModule.load_from_checkpoint(tmp_path / "mid.ckpt", weights_only=False)
    _, steps = fit(module, tmp_path / "again", logger=False)
    assert float(module.trainer.callback_metrics["train/loss"]) == pytest.approx(weighted_mean(steps.losses), rel=1e-5)
