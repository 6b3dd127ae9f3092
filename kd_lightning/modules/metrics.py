"""Per-stage torchmetrics collections (one object per stage, never shared across stages)."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError


def classifier_metrics(num_classes: int, prefix: str, name: str = "") -> MetricCollection:
    """Top-1 accuracy and ECE (plus top-5 when there are more than 10 classes).

    ``name`` prefixes each key, e.g. ``teacher_`` → ``val/teacher_acc``.
    """
    metrics = {
        f"{name}acc": MulticlassAccuracy(num_classes, average="micro"),
        f"{name}ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
    }
    if num_classes > 10:
        metrics[f"{name}acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def agreement_metric(num_classes: int) -> MulticlassAccuracy:
    """Top-1 agreement: student predictions scored against the teacher's argmax."""
    return MulticlassAccuracy(num_classes, average="micro")
