"""Magnitude pruning with ``torch.nn.utils.prune``, and a KD fine-tune that keeps the zeros.

Two methods (Han et al. 2015; Li et al. 2017):

``global_unstructured``
    remove the ``amount`` smallest-|w| weights across *all* conv/linear layers together
    (L1 magnitude, one global threshold), so layers with many redundant weights lose more.
``ln_structured``
    in every conv/linear layer, remove the ``amount`` output channels (rows) with the
    smallest L``n`` norm. The channels are zeroed, not physically removed: dense kernels
    run at the same speed, but the zero channels mark what a slimming step could cut.

Pruning is a re-parametrisation (``weight = weight_orig * weight_mask`` in a forward
pre-hook) while fine-tuning, so gradients never revive pruned weights; ``make_permanent``
folds the mask into plain ``weight`` tensors before saving (``prune.remove``).
The classifier (the last ``nn.Linear``) is left dense unless ``include_classifier``:
structured pruning of its rows would delete whole classes, and it is tiny anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.utils import prune

from kd_lightning.errors import ConfigError
from kd_lightning.losses import CrossEntropy, KLDivergence
from kd_lightning.models import create_model
from kd_lightning.modules import DistillationModule, TeacherSpec

PruneMethod = Literal["global_unstructured", "ln_structured"]
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_modules(model: nn.Module, include_classifier: bool = False) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers with a ``weight``; the last ``nn.Linear`` (the classifier) is
    excluded unless ``include_classifier``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if not include_classifier:
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        if linears:
            layers = [(n, m) for n, m in layers if n != linears[-1]]
    return layers


def check_amount(amount: float, field: str = "prune.amount") -> float:
    if not 0.0 < amount < 1.0:
        raise ConfigError(field, amount, "use a fraction of weights to remove in (0, 1), e.g. 0.5")
    return float(amount)


def prune_model(
    model: nn.Module,
    method: PruneMethod = "global_unstructured",
    amount: float = 0.5,
    norm: float = 2.0,
    include_classifier: bool = False,
) -> list[str]:
    """Prune ``model`` in place (re-parametrised: call ``make_permanent`` before saving).

    Returns the names of the pruned layers.
    """
    amount = check_amount(amount)
    layers = prunable_modules(model, include_classifier)
    if not layers:
        raise ConfigError(
            "prune.method", method,
            f"{getattr(model, 'kd_name', type(model).__name__)} has no conv/linear layer to prune "
            "(besides the classifier: set prune.include_classifier=true)",
        )
    if method == "global_unstructured":
        prune.global_unstructured(
            [(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=amount
        )
    elif method == "ln_structured":
        for _, m in layers:
            # dim 0 = output channels of a conv, output units (rows) of a linear layer
            prune.ln_structured(m, "weight", amount=amount, n=norm, dim=0)
    else:
        raise ConfigError("prune.method", method, "use 'global_unstructured' or 'ln_structured'")
    return [n for n, _ in layers]


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight (``prune.remove``); returns ``model``."""
    for m in model.modules():
        for name in [k[: -len("_orig")] for k, _ in m.named_parameters(recurse=False) if k.endswith("_orig")]:
            prune.remove(m, name)
    return model


def weight_sparsity(model: nn.Module, include_classifier: bool = True) -> float:
    """Share of exactly-zero weights over the conv/linear layers (after ``make_permanent``)."""
    ws = [m.weight for _, m in prunable_modules(model, include_classifier)]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0


def zero_channels(layer: nn.Module) -> int:
    """Number of output channels (rows) of a layer's weight that are entirely zero."""
    w = layer.weight.detach().flatten(1)
    return int((w.abs().sum(1) == 0).sum())


@dataclass
class PruneConfig:
    """What to prune.

    Args:
        method: ``global_unstructured`` (L1, one threshold over all layers),
            ``ln_structured`` (whole output channels per layer, by L``norm``) or ``none``.
        amount: fraction of the prunable weights (or of each layer's channels) to remove.
        norm: the ``n`` of ``ln_structured`` (2 = L2 norm of each channel).
        include_classifier: also prune the final linear layer.
    """

    method: Literal["global_unstructured", "ln_structured", "none"] = "global_unstructured"
    amount: float = 0.5
    norm: float = 2.0
    include_classifier: bool = False


@dataclass
class FinetuneConfig:
    """The KD fine-tune after pruning: the same teacher(s), Hinton KD + CE.

    Args:
        max_epochs: epochs of fine-tuning (0 skips it).
        lr: Adam learning rate (lower than for training from scratch).
        temperature, ce_weight, kd_weight: the KD loss (``CrossEntropy`` + ``KLDivergence``).
        accelerator: Lightning accelerator for the fine-tune.
        limit_train_batches, limit_val_batches: as in ``lightning.Trainer`` (for smoke runs).
    """

    max_epochs: int = 3
    lr: float = 5e-4
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    accelerator: str = "cpu"
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0


def kd_finetune(
    student_name: str,
    student_kwargs: dict,
    student_state: dict[str, torch.Tensor],
    teachers: Sequence[TeacherSpec],
    datamodule: L.LightningDataModule,
    num_classes: int,
    input_shape: tuple[int, int, int],
    cfg: FinetuneConfig,
    log_dir: Path,
    prune_fn: Callable[[nn.Module], object] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Load ``student_state``, apply ``prune_fn`` and KD-fine-tune it from ``teachers``.

    Reuses ``DistillationModule`` and a plain ``Trainer``, so the fine-tune logs the same
    metrics as any KD run (``log_dir``). Returns ``(pruned before fine-tune, fine-tuned)``,
    both with their pruning made permanent, as fresh models without hooks.
    """
    if cfg.max_epochs < 0:
        raise ConfigError("finetune.max_epochs", cfg.max_epochs, "use 0 (no fine-tune) or more")
    if cfg.lr <= 0:
        raise ConfigError("finetune.lr", cfg.lr, "use a learning rate > 0, e.g. 5e-4")
    heads = [CrossEntropy(cfg.ce_weight), KLDivergence(cfg.kd_weight, temperature=cfg.temperature)]
    lr = cfg.lr
    module = DistillationModule(
        student=student_name, student_kwargs=student_kwargs, teacher=list(teachers), heads=heads,
        num_classes=num_classes, input_shape=input_shape,
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
    )
    module.student.load_state_dict(student_state)
    if prune_fn is not None:
        prune_fn(module.student)  # in place: the module's feature taps stay attached
    before = _fresh_copy(module.student, student_name, student_kwargs, num_classes, input_shape)
    if cfg.max_epochs > 0:
        trainer = L.Trainer(
            accelerator=cfg.accelerator, devices=1, max_epochs=cfg.max_epochs,
            limit_train_batches=cfg.limit_train_batches, limit_val_batches=cfg.limit_val_batches,
            logger=CSVLogger(str(log_dir), name="finetune"), enable_checkpointing=False,
            enable_progress_bar=True, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=datamodule)
        module.cpu()
    after = _fresh_copy(module.student, student_name, student_kwargs, num_classes, input_shape)
    return before, after


def _fresh_copy(
    model: nn.Module, name: str, kwargs: dict, num_classes: int, input_shape: tuple[int, int, int]
) -> nn.Module:
    """A hook-free copy of ``model`` with its pruning folded in (``model`` is untouched)."""
    fresh = create_model(name, num_classes, input_shape[0], **kwargs)
    fresh.load_state_dict(dense_state_dict(model))
    return fresh.eval()


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with every ``x_orig``/``x_mask`` pair folded into ``x``.

    (A pruned module cannot be deep-copied: its ``weight`` is a computed non-leaf tensor.)
    """
    state = model.state_dict()
    dense = {}
    for key, value in state.items():
        if key.endswith("_orig") and f"{key[:-5]}_mask" in state:
            dense[key[:-5]] = (value * state[f"{key[:-5]}_mask"]).detach().cpu().clone()
        elif not (key.endswith("_mask") and f"{key[:-5]}_orig" in state):
            dense[key] = value.detach().cpu().clone()
    return dense
