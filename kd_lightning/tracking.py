"""Run metadata for whichever logger a run uses: resolved config, git revision, teacher metrics.

``TrackingSaveConfigCallback`` replaces LightningCLI's ``SaveConfigCallback`` (it still writes
``config.yaml`` into the log dir) and additionally:

* sends the resolved config and the git revision to the logger: W&B run config,
  a TensorBoard text entry, ``hparams.yaml`` for CSV;
* records the frozen teacher's metrics *once* per run (W&B summary ``teacher/val_acc`` …,
  a single logged point elsewhere), since they do not change from epoch to epoch.

W&B never needs the network here: ``configs/logger/wandb.yaml`` is offline by default and
``log_experiment_to_wandb`` follows the same switch.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

_REPO = Path(__file__).resolve().parents[1]


def git_revision(path: str | Path | None = None) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` of the repository holding ``path``
    (default: this package's checkout); ``"unknown"`` outside a git checkout."""
    where = str(path or _REPO)
    try:
        sha = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        # result files are outputs, not code: regenerating several in a row stays "clean"
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)docs/results"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}
    return {"git_commit": sha, "git_dirty": bool(dirty)}


def log_run_metadata(loggers: list[Logger], config_yaml: str, info: Mapping[str, Any]) -> None:
    """Send the resolved config (YAML text) and ``info`` (git revision …) to every logger."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            try:
                config = yaml.safe_load(config_yaml)
            except yaml.YAMLError:
                config = {"text": config_yaml}
            logger.experiment.config.update({"cli": config, **info}, allow_val_change=True)
        elif isinstance(logger, TensorBoardLogger):
            text = "\n".join(f"    {line}" for line in config_yaml.splitlines())  # markdown code
            logger.experiment.add_text("config", text, 0)
            logger.experiment.add_text("git", ", ".join(f"{k}: {v}" for k, v in info.items()), 0)
        else:  # CSVLogger and others: merged into hparams.yaml next to the metrics
            logger.log_hyperparams(dict(info))


def log_summary(loggers: list[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Values that hold for the whole run: the W&B summary, else one logged point."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(dict(metrics))
        else:
            logger.log_metrics(dict(metrics), step=step)


class TrackingSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's config saver, plus config/git/teacher metadata for the logger."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._teacher_logged: set[str] = set()

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.loggers:
            return
        try:
            config_yaml = self.parser.dump(self.config, skip_none=False)
        except Exception as err:  # never let metadata break a run
            config_yaml = f"# config could not be serialised: {err}"
        log_run_metadata(trainer.loggers, config_yaml, git_revision())

    def _log_teacher(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        if split in self._teacher_logged or not hasattr(pl_module, "teachers"):
            return
        if trainer.sanity_checking or not trainer.is_global_zero or not trainer.loggers:
            return
        prefix = f"{split}/teacher_"
        values = {
            f"teacher/{split}_{k[len(prefix):]}": float(v)
            for k, v in trainer.callback_metrics.items() if k.startswith(prefix)
        }
        if values:
            log_summary(trainer.loggers, values, trainer.global_step)
            self._teacher_logged.add(split)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the epoch's validation: the (frozen) teacher's val metrics, logged once
        self._log_teacher(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_teacher(trainer, pl_module, "test")


def wandb_settings(logger_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``project``/``entity`` from a WandbLogger config's ``init_args`` (for summary runs)."""
    init = dict((logger_config or {}).get("init_args") or {})
    return {k: init[k] for k in ("project", "entity") if init.get(k)}


def log_experiment_to_wandb(
    name: str,
    out_dir: Path,
    rows: list[dict[str, Any]],
    images: list[Path],
    online: bool,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """One extra W&B run per experiment (job_type ``summary``) holding the results table
    and the plots, in the experiment's group. Offline unless ``online``; ``WANDB_MODE=disabled``
    in the environment is respected."""
    import wandb

    mode = "disabled" if os.environ.get("WANDB_MODE") == "disabled" else ("online" if online else "offline")
    if mode == "online":  # same rule as the runs' loggers: no server or no key → offline
        from kd_lightning.tracking_guard import has_credentials, reachable, wandb_endpoint

        host, port = wandb_endpoint()
        if not (has_credentials(host) and reachable(host, port)):
            warnings.warn(f"W&B server {host} unreachable or no API key: summary run logged "
                          "offline (upload it with `wandb sync`)", stacklevel=2)
            mode = "offline"
    run = wandb.init(
        project=(settings or {}).get("project", "kd-lightning"),
        entity=(settings or {}).get("entity"),
        group=name, job_type="summary", name=f"{name}-summary",
        dir=str(out_dir), mode=mode, config=git_revision(), reinit="finish_previous",
    )
    try:
        if rows:
            columns = list(rows[0].keys())
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            run.log({"results": table})
        for image in images:
            run.log({image.stem: wandb.Image(str(image))})
    finally:
        run.finish()
