"""The experiment's figures, drawn with matplotlib's object API on the Agg canvas.

``matplotlib.figure.Figure`` is used without ``pyplot``, so making plots never changes the
global backend of a notebook or needs a display.

* ``results_bars.png``: test accuracy per row, best-val and last epoch, error bars = std;
* ``val_curves.png``: validation accuracy per epoch, students (mean ± std band over seeds)
  against the teacher;
* ``reliability.png``: reliability diagrams (accuracy vs confidence, 15 bins) of the teacher
  and every student row, from the saved test predictions of the best-val checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kd_lightning.experiment.progress import read_history

COLORS = {"teacher": "#444444", "scratch": "#1f77b4"}
KD_COLORS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _colors(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    out, k = {}, 0
    for r in rows:
        if r["kind"] in COLORS:
            out[r["name"]] = COLORS[r["kind"]]
        else:
            out[r["name"]] = KD_COLORS[k % len(KD_COLORS)]
            k += 1
    return out


def plot_results(rows: Sequence[dict[str, Any]], path: Path | None = None) -> Figure:
    """Grouped bars: test accuracy (%) of the best-val checkpoint and of the last epoch."""
    fig = Figure(figsize=(1.9 * len(rows) + 2, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.38
    lows, highs = [], []
    for offset, which, hatch in ((-width / 2, "best", None), (width / 2, "last", "//")):
        means = np.array([np.nan if r[f"test_acc_{which}_mean"] is None else 100 * r[f"test_acc_{which}_mean"]
                          for r in rows])
        stds = np.array([0.0 if r[f"test_acc_{which}_std"] is None else 100 * r[f"test_acc_{which}_std"]
                         for r in rows])
        label = "best-val checkpoint" if which == "best" else "last epoch"
        bars = ax.bar(x + offset, np.nan_to_num(means), width, yerr=stds, capsize=4, label=label,
                      color=[_colors(rows)[r["name"]] for r in rows], alpha=0.9 if which == "best" else 0.55,
                      hatch=hatch, edgecolor="white")
        for bar, m, s in zip(bars, means, stds):
            if not np.isnan(m):
                ax.annotate(f"{m:.2f}", (bar.get_x() + bar.get_width() / 2, m + s), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
                lows.append(m - s)
                highs.append(m + s)
    if lows:  # zoom on the differences; the axis does not start at 0, and says so
        ax.set_ylim(max(0.0, min(lows) - 2.0), max(highs) + 0.15 * (max(highs) - min(lows) + 2.0))
    ax.set_xticks(x, [f"{r['name']}\n(n={r['n_seeds']})" for r in rows])
    ax.set_ylabel("test accuracy (%), axis not from 0")
    ax.set_title("Test accuracy, mean ± std over seeds")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _curve(histories: list[list[dict[str, float]]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std of ``key`` over runs, cut to the epochs all runs reached."""
    series = [[h[key] for h in hist if key in h] for hist in histories]
    series = [s for s in series if s]
    if not series:
        return np.array([]), np.array([]), np.array([])
    n = min(len(s) for s in series)
    arr = 100 * np.array([s[:n] for s in series])
    return np.arange(1, n + 1), arr.mean(0), arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(n)


def plot_curves(out_dir: Path, rows: Sequence[dict[str, Any]], path: Path | None = None) -> Figure:
    """Validation accuracy per epoch: each student row against the teacher's own curve."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(rows)
    teacher_level = []
    for r in rows:
        hists = [read_history(out_dir / r["name"] / f"seed{s}" / "history.jsonl") for s in r["seeds"]]
        key = "val/acc"
        epochs, mean, std = _curve(hists, key)
        if r["kind"] == "kd":
            _, t_mean, _ = _curve(hists, "val/teacher_acc")
            teacher_level += list(t_mean[-1:])
        if not len(epochs):
            continue
        style = "--" if r["kind"] == "teacher" else "-"
        ax.plot(epochs, mean, style, color=colors[r["name"]], label=f"{r['name']} (n={len(hists)})",
                marker="o", markersize=3)
        if r["kind"] != "teacher" and len(hists) > 1:
            ax.fill_between(epochs, mean - std, mean + std, color=colors[r["name"]], alpha=0.2)
    if teacher_level:  # the frozen teacher the students saw, as measured in the KD runs
        ax.axhline(teacher_level[0], color=COLORS["teacher"], ls=":", lw=1, label="teacher (frozen)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy: students (mean ± std) vs teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, np.ndarray | float]:
    """Per-bin confidence, accuracy and count of the top-1 prediction, and the l1 ECE
    (the same binning as torchmetrics' ``MulticlassCalibrationError``)."""
    conf, pred = probs.float().max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf, edges[1:-1], right=False)  # bins (lo, hi], the first [0, hi]
    count = torch.bincount(idx, minlength=n_bins).float()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins) / count.clamp_min(1)
    mean_conf = torch.bincount(idx, weights=conf, minlength=n_bins) / count.clamp_min(1)
    ece = float(((acc - mean_conf).abs() * count).sum() / count.sum().clamp_min(1))
    return {"edges": edges.numpy(), "acc": acc.numpy(), "conf": mean_conf.numpy(),
            "count": count.numpy(), "ece": ece}


def plot_reliability(out_dir: Path, rows: Sequence[dict[str, Any]], path: Path | None = None,
                     n_bins: int = 15) -> Figure:
    """One reliability diagram per row (seeds pooled), teacher first."""
    panels = []
    for r in rows:
        files = [out_dir / r["name"] / f"seed{s}" / "test_predictions.pt" for s in r["seeds"]]
        preds = [torch.load(f, weights_only=True) for f in files if f.is_file()]
        if preds:
            probs = torch.cat([p["probs_best"] for p in preds])
            labels = torch.cat([p["labels"] for p in preds])
            panels.append((r, reliability_bins(probs, labels, n_bins)))
    fig = Figure(figsize=(3.2 * max(1, len(panels)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    colors = _colors(rows)
    for ax, (r, b) in zip(axes, panels):
        centers = (b["edges"][:-1] + b["edges"][1:]) / 2
        width = b["edges"][1] - b["edges"][0]
        has = b["count"] > 0
        ax.bar(centers[has], b["acc"][has], width * 0.95, color=colors[r["name"]], alpha=0.8,
               label="accuracy")
        ax.bar(centers[has], (b["conf"] - b["acc"])[has], width * 0.95, bottom=b["acc"][has],
               color=(0.0, 0.0, 0.0, 0.08), edgecolor="#222222", hatch="///", lw=0.6,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{r['name']}  ECE {100 * b['ece']:.2f}%", fontsize=10)
        ax.set_aspect("equal")
    axes[0].set_ylabel("accuracy")
    if panels:
        axes[0].legend(loc="upper left", fontsize=7)
    fig.suptitle("Reliability on the test split (best-val checkpoints; seeds pooled, so ECE is "
                 "that of the pooled predictions)", fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def make_plots(out_dir: Path, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]] = ()) -> list[Path]:
    """All three figures as PNGs in ``<out_dir>/plots``; returns their paths."""
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = [plots / "results_bars.png", plots / "val_curves.png", plots / "reliability.png"]
    plot_results(rows, paths[0])
    plot_curves(Path(out_dir), rows, paths[1])
    plot_reliability(Path(out_dir), rows, paths[2])
    return paths
