"""The ``kd-lightning`` command: a LightningCLI plus a few research subcommands.

``kd-lightning fit|validate|test|predict -c config.yaml ...`` is plain LightningCLI in
subclass mode: YAML picks any LightningModule/DataModule by ``class_path``. The data's
``num_classes`` and ``input_shape`` are linked into the model, so configs state them once.
Other subcommands (``experiment`` …) are dispatched to their own modules.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from kd_lightning.callbacks import KDModelCheckpoint
from kd_lightning.errors import ConfigError

#: subcommand → "module:function(args)"; each one owns its own argument parser.
EXTRA_COMMANDS: dict[str, str] = {
    "experiment": "kd_lightning.experiment.runner:main",
    "compress": "kd_lightning.compress.pipeline:main",
}

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "logs", "name": "kd"},
    },
}


class KDLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(KDModelCheckpoint, "checkpoint")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="after `fit`, test the best checkpoint (by the module's monitor) on the test split",
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")


    def after_fit(self) -> None:
        if not self.config_init[self.subcommand].get("test_after_fit"):
            return
        ckpt = self.trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=False)


def build_cli(args: list[str] | None = None, run: bool = True) -> KDLightningCLI:
    with warnings.catch_warnings():
        # explicit args from tests/notebooks are intended; Lightning warns if sys.argv is also set
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return _build_cli(args, run)


def _build_cli(args: list[str] | None, run: bool) -> KDLightningCLI:
    return KDLightningCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        trainer_defaults=TRAINER_DEFAULTS,
        # every run saves its resolved config into its own log dir; never refuse a rerun
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> KDLightningCLI | object:
    """Entry point for the console script, tests and notebooks: ``main(["fit", "-c", ...])``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    return build_cli(args)


def console_main() -> None:
    """The installed ``kd-lightning`` script: bad input ends in one clear line, not a traceback."""
    try:
        main()
    except ConfigError as err:
        print(f"kd-lightning: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
