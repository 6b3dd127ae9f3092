"""Test accuracy after every training epoch, and the three numbers papers report.

The CIFAR distillation tables quote different checkpoints, and the gap between them is
often as large as the gain being claimed:

* ``last``: the final epoch's test accuracy — RepDistiller (``train_student.py`` prints
  the test accuracy of every epoch; the paper's tables quote the last one);
* ``best_by_val``: the test accuracy of the epoch whose *validation* accuracy was best —
  the only one of the three in which test data never picks an epoch (needs a val split);
* ``best_on_test``: the best test accuracy over all epochs — what mdistiller
  (``mdistiller/engine/trainer.py``: ``best_acc = max(best_acc, test_acc)``) and KD-Zoo
  (``train_kd.py``: ``best_top1``) report; optimistic, since test data picks the epoch.

``TestEveryEpoch`` measures test accuracy after each training epoch (after that epoch's
validation, when there is one), logs it as ``epoch_test/acc`` and writes all three,
labelled, with the per-epoch history to ``<log_dir>/results.json`` after every epoch (so
a killed run still has its numbers). Its history is saved in checkpoints, so a resumed
run keeps the epochs it already measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import ConfigError
from kd_lightning.modules.inputs import model_inputs

#: result key → the label every table prints beside it
LABELS: dict[str, str] = {
    "last": "test acc, last epoch (as RepDistiller reports it)",
    "best_by_val": "test acc, epoch best on validation (test data never picks the epoch)",
    "best_on_test": "test acc, best epoch on test (as mdistiller/KD-Zoo report it; optimistic)",
}


class TestEveryEpoch(Callback):
    """Measure the trained network's top-1 test accuracy after every training epoch.

    Args:
        output: the result file; default ``<trainer.log_dir>/results.json`` (else
            ``trainer.default_root_dir``).
        every_n_epochs: measure every N epochs (the last epoch is always measured).
        monitor: the validation metric that picks ``best_by_val`` (higher is better).
        source_reports: which of the three the recipe's source published (``last`` for
            RepDistiller, ``best_on_test`` for mdistiller/KD-Zoo/torchdistill); written to
            the result file so a table compares like with like.
    """

    __test__ = False  # a Lightning callback, not a pytest class

    def __init__(self, output: str | None = None, every_n_epochs: int = 1,
                 monitor: str = "val/acc",
                 source_reports: Literal["last", "best_by_val", "best_on_test"] | None = None,
                 ) -> None:
        if every_n_epochs < 1:
            raise ConfigError("TestEveryEpoch.every_n_epochs", every_n_epochs, "use 1 or more")
        if source_reports is not None and source_reports not in LABELS:
            raise ConfigError("TestEveryEpoch.source_reports", source_reports,
                              f"use one of {', '.join(LABELS)}")
        self.output, self.every_n_epochs, self.monitor = output, every_n_epochs, monitor
        self.source_reports = source_reports
        #: one entry per measured epoch: {"epoch" (1-based), "test_acc", "val_acc"}
        self.history: list[dict[str, Any]] = []
        self.path: Path | None = None

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            root = trainer.log_dir or trainer.default_root_dir
            self.path = Path(self.output) if self.output else Path(root) / "results.json"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so val/acc is this epoch's
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        acc = self.test_accuracy(trainer, pl_module)
        val = trainer.callback_metrics.get(self.monitor)
        ran_val = bool(trainer.num_val_batches) and sum(trainer.num_val_batches) > 0
        self.history = [h for h in self.history if h["epoch"] < epoch]  # a re-run epoch
        self.history.append({
            "epoch": epoch, "test_acc": acc,
            "val_acc": float(val) if val is not None and ran_val else None,
        })
        pl_module.log("epoch_test/acc", acc, logger=True, sync_dist=False, rank_zero_only=True)
        if trainer.is_global_zero:
            self.write(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # -- the measurement ------------------------------------------------------------------
    @staticmethod
    def test_accuracy(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Top-1 accuracy of the trained network (student or model) on the whole test split.

        Global RNG state is forked so that measuring never changes training randomness
        (a DataLoader iterator draws its base seed from it). ``trainer.limit_test_batches``
        applies, as to the test loop (an int: batches; a float: a share of them).
        """
        dm = trainer.datamodule
        if dm is None:
            raise RuntimeError("TestEveryEpoch needs a DataModule with a test_dataloader")
        net = getattr(pl_module, "student", None)
        role = "student"
        if net is None:
            net, role = pl_module.model, "model"
        was_training = net.training
        net.eval()
        correct = total = 0
        loader = dm.test_dataloader()
        limit = trainer.limit_test_batches
        n_batches = len(loader) if limit is None else (
            int(limit) if isinstance(limit, int) else max(1, int(limit * len(loader)))
        )
        with torch.random.fork_rng(devices=[]), torch.inference_mode(), \
                trainer.precision_plugin.forward_context():
            for i, batch in enumerate(loader):
                if i >= n_batches:
                    break
                batch = {k: v.to(pl_module.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
                logits = net(*model_inputs(net, batch, role))
                correct += int((logits.argmax(dim=1) == batch["label"]).sum())
                total += len(batch["label"])
        net.train(was_training)
        return correct / max(total, 1)

    # -- the three numbers ----------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, Any]]:
        """``{last, best_by_val, best_on_test}`` → ``{value, epoch, label}`` (None if n/a)."""
        def entry(h: dict[str, Any] | None, key: str) -> dict[str, Any]:
            return {"value": None if h is None else h["test_acc"],
                    "epoch": None if h is None else h["epoch"], "label": LABELS[key]}

        hist = self.history
        with_val = [h for h in hist if h["val_acc"] is not None]
        # ties go to the earliest epoch, as ModelCheckpoint keeps the first best
        by_val = max(with_val, key=lambda h: (h["val_acc"], -h["epoch"])) if with_val else None
        on_test = max(hist, key=lambda h: (h["test_acc"], -h["epoch"])) if hist else None
        return {"last": entry(hist[-1] if hist else None, "last"),
                "best_by_val": entry(by_val, "best_by_val"),
                "best_on_test": entry(on_test, "best_on_test")}

    def write(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        train_set = getattr(dm, "train_set", None)
        record = {
            "accuracy": self.summary(),
            "source_reports": self.source_reports,
            "protocol": {
                "val_fraction": getattr(dm, "val_fraction", None),
                "train_images": None if train_set is None else len(train_set),
                "validation": "none (val_fraction 0: best_by_val is not available)"
                if getattr(dm, "val_fraction", None) == 0 else f"held-out split ({self.monitor})",
            },
            "epochs_measured": len(self.history),
            "history": self.history,
        }
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.path)
