"""One line per epoch for experiment runs, plus a per-epoch metric history on disk.

The history (``history.jsonl``: one JSON object per epoch) is what the validation-curve
plot reads, so curves exist whatever logger (CSV, TensorBoard, W&B) the runs used.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch


class ProgressCallback(L.Callback):
    """Prints ``<label> epoch e/E  loss …  <monitor> …  (s)`` after each training epoch.

    Args:
        label: what this run is, e.g. ``quickstart · kd_t4 · seed 1``.
        history_path: a JSON-lines file that receives every epoch-level scalar metric.
    """

    def __init__(self, label: str = "", history_path: str | None = None) -> None:
        self.label = label
        self.history_path = Path(history_path) if history_path else None
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation, so callback_metrics hold train and val values
        if not trainer.is_global_zero:
            return
        metrics = epoch_scalars(trainer.callback_metrics)
        epoch = trainer.current_epoch
        if self.history_path is not None:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with self.history_path.open("a") as fh:
                fh.write(json.dumps({"epoch": epoch, "step": trainer.global_step, **metrics}) + "\n")
        monitor = getattr(pl_module, "monitor", "val/acc")
        parts = [f"{self.label}  epoch {epoch + 1}/{trainer.max_epochs}"]
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train loss {loss:.4f}")
        if monitor in metrics:
            parts.append(f"{monitor} {metrics[monitor]:.4f}")
        parts.append(f"{time.perf_counter() - self._t0:.1f} s")
        print("  ".join(parts), flush=True)


def epoch_scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Finite scalar metrics as floats; per-step duplicates (``*_step``) are dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k.endswith("_step"):
            continue
        value = float(v.item() if isinstance(v, torch.Tensor) else v)
        if math.isfinite(value):
            out[k] = value
    return out


def read_history(path: Path) -> list[dict[str, float]]:
    """The epochs of one run's ``history.jsonl``; a crashed run's partial last line is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
