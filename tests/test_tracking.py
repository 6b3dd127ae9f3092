"""Tracking: W&B offline runs, TensorBoard event files, config + git revision + teacher metrics."""

from __future__ import annotations

import re
from pathlib import Path

from kd_lightning.cli import main
from kd_lightning.tracking import git_revision
from tests.conftest import CONFIGS, DEBUG_TRAINER


def test_git_revision_of_this_checkout() -> None:
    info = git_revision()
    assert set(info) == {"git_commit", "git_dirty"}
    assert info["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert git_revision("/") == {"git_commit": "unknown", "git_dirty": None}  # not a checkout


def test_wandb_offline_writes_a_run_directory(monkeypatch, tmp_path: Path, mnist_teacher_ckpt: Path) -> None:
    """configs/logger/wandb.yaml is offline by default: a local run dir, no network."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    try:
        main([
            "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), "-c", str(CONFIGS / "logger" / "wandb.yaml"),
            *DEBUG_TRAINER, f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.group=exp",
            "--trainer.logger.init_args.job_type=kd", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            "--test_after_fit=true",
        ])
        run = wandb.run  # Lightning leaves the run open: inspect it before finishing
        assert run is not None and run.offline
        assert (run.group, run.job_type) == ("exp", "kd")
        assert "git_commit" in run.config  # resolved config + revision, in the run config
        assert run.config["cli"]["model"]["init_args"]["student"] == "mlp_tiny"
        # the frozen teacher's metrics, once per run, as summary values
        assert {"teacher/val_acc", "teacher/test_acc"} <= set(run.summary.keys())
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the local record `wandb sync` would upload


def test_tensorboard_config_writes_event_files(tmp_path: Path) -> None:
    main([
        "fit", "-c", str(CONFIGS / "quickstart" / "scratch.yaml"), "-c", str(CONFIGS / "logger" / "tensorboard.yaml"),
        *DEBUG_TRAINER, f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}", "--test_after_fit=false",
    ])
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0})
    acc.Reload()
    assert "val/acc" in acc.Tags()["scalars"]
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])  # the resolved config text


def test_experiment_summary_run_offline(monkeypatch, tmp_path: Path) -> None:
    """The per-experiment W&B run (results table + plots) is written offline, in the group."""
    from kd_lightning.experiment.plots import plot_results
    from kd_lightning.tracking import log_experiment_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    row = {"name": "scratch", "kind": "scratch", "n_seeds": 1, "test_acc_best_mean": 0.9,
           "test_acc_best_std": None, "test_acc_last_mean": 0.89, "test_acc_last_std": None}
    png = tmp_path / "results_bars.png"
    plot_results([row], png)
    log_experiment_to_wandb("exp", tmp_path, [row], [png], online=False)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
