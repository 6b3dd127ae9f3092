"""ClassifierModule: trains teachers and from-scratch student baselines on labels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd_lightning.errors import ConfigError
from kd_lightning.models import model_from_config
from kd_lightning.modules.base import BaseModule
from kd_lightning.modules.inputs import builder_inputs, check_input_shape, model_inputs
from kd_lightning.modules.metrics import classifier_metrics


class ClassifierModule(BaseModule):
    """Supervised training of any registered network.

    Args:
        model: registered model name (``kd_lightning.models.list_models()``), or
            ``tv:<name>``/``timm:<name>``.
        model_kwargs: extra builder arguments, e.g. ``{hidden: [256, 256]}`` for ``mlp``.
        num_classes: number of classes; linked from the DataModule by the CLI.
        input_shape: (C, H, W) of images or (max_length,) of text; linked from the DataModule.
        vocab_sizes: for text, the vocabulary size of each token-id batch key; linked from
            the DataModule. The model reads the batch as ``kd_lightning.modules.inputs`` says.
        label_smoothing: ε for label-smoothed CE.
        optimizer, lr_scheduler: see ``BaseModule``.

    Logs ``{train,val,test}/acc``, ``/ece`` (and ``/acc_top5`` above 10 classes),
    ``{val,test}/loss``, and ``train/loss_step``/``train/loss_epoch`` (``train/loss`` for
    callbacks; see ``BaseModule.log_train_step``).
    """

    monitor = "val/acc"
    prog_bar_metrics = ("model", "loss")

    def __init__(
        self,
        model: str = "lenet5",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        vocab_sizes: dict[str, int] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.input_shape = check_input_shape(input_shape)
        inputs = builder_inputs(self.input_shape, vocab_sizes, "model")
        self.model = model_from_config(model, num_classes, inputs, "model.model", model_kwargs)
        self.label_smoothing = label_smoothing
        self.train_metrics = classifier_metrics(num_classes, "train/")
        self.val_metrics = nn.ModuleDict({"model": classifier_metrics(num_classes, "val/"), "loss": MeanMetric()})
        self.test_metrics = nn.ModuleDict({"model": classifier_metrics(num_classes, "test/"), "loss": MeanMetric()})

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(*inputs)

    def _eval_step(self, batch: dict[str, Tensor], stage: str, metrics: nn.ModuleDict) -> None:
        logits = self(*model_inputs(self.model, batch, "model"))
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        metrics["model"].update(logits, batch["label"])
        metrics["loss"].update(loss, weight=len(logits))
        self._eval_updated.add(stage)

    # Unlabelled transfer-set samples (label -1) would crash CE (a device assert on GPU).
    # kd-lightning DataModules know their count: refuse once, before the first step. Other
    # DataModules get a per-batch check (one host sync per step, so only for them).
    _check_batch_labels: bool = True

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self._check_batch_labels = not hasattr(dm, "num_unlabelled")
        if not self._check_batch_labels and dm.num_unlabelled:
            _refuse_unlabelled(getattr(dm, "train_on", None), dm.num_unlabelled)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self._check_batch_labels and bool((batch["label"] < 0).any()):
            _refuse_unlabelled(None, int((batch["label"] < 0).sum()))
        logits = self(*model_inputs(self.model, batch, "model"))
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        # metrics and the epoch loss are logged once per epoch (BaseModule.on_train_epoch_end)
        self.train_metrics.update(logits.detach(), batch["label"])
        self._train_metrics_updated = True
        self.log_train_step(loss, len(logits), batch_idx)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(*model_inputs(self.model, batch, "model")).softmax(dim=1)


def _refuse_unlabelled(train_on: str | None, count: int) -> None:
    raise ConfigError(
        "data.train_on", train_on,
        f"ClassifierModule trains on labels, but {count} training sample(s) are unlabelled (label -1). "
        "Set data.train_on=labeled to train on the labelled subset, or distil with DistillationModule",
    )
