"""``LMEvalCallback``: ``kd-lightning lm-eval`` on the best checkpoint when a fit ends.

Add it to an LM run (the tasks are checked when the fit starts, so a bad name fails before
training; lm-eval is imported only then)::

    kd-lightning fit -c configs/llm/quickstart/kd.yaml \\
        --trainer.callbacks+=kd_lightning.callbacks.LMEvalCallback \\
        --trainer.callbacks.tasks=movie_reviews_completion,movie_reviews_choice

It writes ``<best>.lm_eval.json`` beside the checkpoint (``kd_lightning/lm_harness.py``;
replaced by a rerun, as the checkpoint is), recording the ``kd-lightning lm-eval`` command
that reproduces it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import ConfigError


class LMEvalCallback(Callback):
    """Runs ``kd-lightning lm-eval`` on the fit's best checkpoint (rank 0) when it ends.

    Args:
        tasks: comma-separated lm-eval task names (``configs/lm_eval`` or ``include_path``).
        limit: examples per task (None: all).
        include_path: folders of task YAMLs besides ``configs/lm_eval``.
        batch_size, num_fewshot, bootstrap_iters: as ``kd-lightning lm-eval``'s flags.
        output: the result JSON (default: ``<best checkpoint>.lm_eval.json``).
    """

    def __init__(
        self,
        tasks: str,
        limit: float | None = None,
        include_path: list[str] | None = None,
        batch_size: int = 8,
        num_fewshot: int | None = None,
        bootstrap_iters: int = 100,
        output: str | None = None,
    ) -> None:
        if not isinstance(tasks, str) or not tasks.strip(","):
            raise ConfigError("LMEvalCallback.tasks", tasks, "give comma-separated task names")
        self.tasks, self.limit, self.include_path = tasks, limit, list(include_path or [])
        self.batch_size, self.num_fewshot = batch_size, num_fewshot
        self.bootstrap_iters, self.output = bootstrap_iters, output
        self.result: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from kd_lightning import lm_harness

        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError(
                "LMEvalCallback",
                self.tasks,
                'lm-eval is not installed: pip install "kd-lightning[eval]"',
            ) from None
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        with lm_harness.offline():  # unknown names fail now, not after training
            lm_harness.task_manager(names, [*lm_harness.default_include(), *self.include_path])

    def command(self, ckpt: str) -> list[str]:
        """The ``kd-lightning lm-eval`` arguments this callback runs on ``ckpt``."""
        args = ["--ckpt", ckpt, "--tasks", self.tasks, "--batch-size", str(self.batch_size)]
        args += ["--bootstrap-iters", str(self.bootstrap_iters), "--overwrite"]
        for folder in self.include_path:
            args += ["--include-path", folder]
        if self.limit is not None:
            args += ["--limit", f"{self.limit:g}"]
        if self.num_fewshot is not None:
            args += ["--num-fewshot", str(self.num_fewshot)]
        if self.output:
            args += ["--output", self.output]
        return args

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        path = (ckpt.best_model_path or ckpt.last_model_path) if ckpt is not None else ""
        if not path or not Path(path).is_file():
            raise ConfigError(
                "LMEvalCallback",
                self.tasks,
                "the fit saved no checkpoint to evaluate: "
                "keep checkpointing on (trainer.enable_checkpointing: true)",
            )
        from kd_lightning import lm_harness

        device = "cuda" if pl_module.device.type == "cuda" else "cpu"
        self.result = lm_harness.main([*self.command(path), "--device", device])
