"""kd-lightning reads and writes a few Lightning internals (kd_lightning/lightning_compat.py).
These tests pin each one, so an upgrade that moves or renames one fails here, by name."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import lightning_compat as compat


class _Probe(L.Callback):
    """Records the compat readings at the end of each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(
            (compat.batches_done_in_epoch(trainer), compat.batches_done_in_fit(trainer),
             compat.epoch_is_over(trainer))
        )


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_loop_progress_readings_count_batches_per_epoch_and_per_fit(tmp_path):
    probe = _Probe()
    loader = DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2)  # 3 batches an epoch
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
        default_root_dir=tmp_path,
    )
    trainer.fit(_Tiny(), loader)
    assert probe.seen == [
        (1, 1, False), (2, 2, False), (3, 3, True), (1, 4, False), (2, 5, False), (3, 6, True),
    ]


def test_private_checkpoint_and_signal_members_still_exist():
    # ModelCheckpoint's last-checkpoint writer and the metrics it is given
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters)[:3] == [
        "self", "trainer", "monitor_candidates",
    ]
    assert list(inspect.signature(ModelCheckpoint._monitor_candidates).parameters) == ["self", "trainer"]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    compat.set_received_sigterm(trainer, True)
    assert trainer.received_sigterm is True  # the public reader sees what we wrote
    compat.set_received_sigterm(trainer, False)
    assert trainer.received_sigterm is False


@pytest.mark.parametrize("name", ["num_training_batches", "received_sigterm"])
def test_public_trainer_members_used_alongside_still_exist(name):
    assert hasattr(L.Trainer, name)
