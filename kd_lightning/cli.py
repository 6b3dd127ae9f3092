"""The ``kd-lightning`` command: a LightningCLI plus a few research subcommands.

``kd-lightning fit|validate|test|predict -c config.yaml ...`` is plain LightningCLI in
subclass mode: YAML picks any LightningModule/DataModule by ``class_path``. The data's
``num_classes`` and ``input_shape`` are linked into the model, so configs state them once.
Other subcommands (``experiment`` …) are dispatched to their own modules.

Bad input never reaches the user as a usage dump: config files, YAML and ``ckpt_path`` are
checked before the parse, and a failed parse is explained field by field
(``kd_lightning.preflight.diagnose``); ``console_main`` prints the ConfigError as one line
and exits 2.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kd_lightning.callbacks import KDModelCheckpoint, PreemptionCheckpoint
from kd_lightning.errors import ConfigError
from kd_lightning.preflight import (
    CommandLine,
    Subclass,
    check_ckpt_path,
    check_run_dirs,
    diagnose,
    expand_index_flags,
    load_config_file,
    merged_config,
    name_stacked_run,
)
from kd_lightning.tracking import TrackingSaveConfigCallback
from kd_lightning.tracking_guard import guard_wandb_config
from kd_lightning.translate import translate

#: subcommand → "module:function(args)"; each one owns its own argument parser.
EXTRA_COMMANDS: dict[str, str] = {
    "experiment": "kd_lightning.experiment.runner:main",
    "compress": "kd_lightning.compress.pipeline:main",
    "data": "kd_lightning.data.commands:main",
    "import-teacher": "kd_lightning.import_teacher:main",
    "lm-eval": "kd_lightning.lm_harness:main",
}

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "logs", "name": "kd"},
    },
}


#: LightningCLI's run subcommands; their command lines are checked before the parse
RUN_COMMANDS = ("fit", "validate", "test", "predict")


class ParseFailure(Exception):
    """jsonargparse rejected the command line; ``build_cli`` turns it into a ConfigError."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KDArgumentParser(LightningArgumentParser):
    """Raises ParseFailure instead of printing a usage dump and exiting."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # an inner parse jsonargparse tries and catches itself
            super().error(message, ex)
        raise ParseFailure(message) from ex


def config_schema() -> dict[str, object]:
    """What each top-level key of a run config holds, for ``diagnose``: a class whose
    ``__init__`` the group mirrors, ``Subclass(base)`` for a class_path group, or a type."""
    return {
        "seed_everything": bool | int, "test_after_fit": bool, "ckpt_path": str | None,
        "trainer": L.Trainer, "checkpoint": KDModelCheckpoint, "preemption": PreemptionCheckpoint,
        "model": Subclass(L.LightningModule), "data": Subclass(L.LightningDataModule),
        "optimizer": Any, "lr_scheduler": Any, "config": Any,
    }


class KDLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(KDModelCheckpoint, "checkpoint")
        # SIGTERM (SLURM pre-emption / time limit) saves last.ckpt before exiting
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="after `fit`, test the best checkpoint (by the module's monitor) on the test split",
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.vocab_sizes", "model.init_args.vocab_sizes", apply_on="instantiate")


    def before_instantiate_classes(self) -> None:
        # a W&B logger configured online must not hang the run without network/credentials
        config = self.config[self.subcommand] if self.subcommand else self.config
        guard_wandb_config(config.get("trainer"))

    def before_fit(self) -> None:
        check_run_dirs(self.trainer)  # unwritable log/checkpoint dirs fail now, not at epoch 1

    def after_fit(self) -> None:
        if not self.config_init[self.subcommand].get("test_after_fit"):
            return
        ckpt = self.trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=False)


def build_cli(args: list[str] | None = None, run: bool = True) -> KDLightningCLI:
    argv = list(sys.argv[1:] if args is None else args)
    line = CommandLine.split(argv)
    if line is not None and line.subcommand in RUN_COMMANDS:
        checked = name_stacked_run(check_command_line(line))
        if checked is not line:  # list-index flags or the stacked run's name were rewritten
            argv, line = checked.join(), checked
    with warnings.catch_warnings():
        # explicit args from tests/notebooks are intended; Lightning warns if sys.argv is also set
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        try:
            return _build_cli(argv, run)
        except ParseFailure as failure:
            raise explain(failure, line) from None
        except ValueError as err:  # unwrap jsonargparse's wrapper of a ConfigError
            config_error = _find_config_error(err)
            if config_error is None or config_error is err:
                raise
            raise config_error from None


def check_command_line(line: CommandLine) -> CommandLine:
    """Before the parse: config files exist and are YAML mappings, ``ckpt_path`` is a
    readable checkpoint, and list-index flags become whole-list flags jsonargparse takes."""
    for path in line.config_files:
        load_config_file(path)
    line = expand_index_flags(line)
    merged = merged_config(line)
    ckpt_path = merged.get("ckpt_path")
    check_ckpt_path(ckpt_path if isinstance(ckpt_path, str) else None)
    check_ckpt_module(merged, ckpt_path)
    return line


def check_ckpt_module(merged: dict, ckpt_path: object) -> None:
    """Refuse a checkpoint of another module class than the config's: LightningCLI would
    rebuild the model from the checkpoint's hyper-parameters (e.g. a teacher's ClassifierModule
    for a KD config) and report that model's metrics as the run's (issue 21, finding 3)."""
    model = merged.get("model")
    wanted = model.get("class_path") if isinstance(model, dict) else model
    if not isinstance(ckpt_path, str) or not isinstance(wanted, str) or not Path(ckpt_path).is_file():
        return
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    saved = (ckpt.get("hyper_parameters") or {}).get("_class_path") if isinstance(ckpt, dict) else None
    if isinstance(saved, str) and saved.rpartition(".")[2] != wanted.rpartition(".")[2]:
        raise ConfigError("ckpt_path", ckpt_path, f"is a {saved.rpartition('.')[2]} checkpoint but "
                          f"the config's model is {wanted.rpartition('.')[2]}: give a checkpoint of "
                          "this run, or the config it was trained with")


def explain(failure: ParseFailure, line: CommandLine | None) -> ConfigError:
    """The first bad field of the merged config, else jsonargparse's first line as one line."""
    if line is not None and line.subcommand in RUN_COMMANDS:
        found = diagnose(merged_config(line), config_schema())
        if found is not None:
            return found
    command = line.subcommand if line is not None else "fit"
    first = next((s.strip() for s in failure.message.splitlines() if s.strip()), failure.message)
    return ConfigError("command line", first, f"see `kd-lightning {command} --help`")


def _build_cli(args: list[str], run: bool) -> KDLightningCLI:
    return KDLightningCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        trainer_defaults=TRAINER_DEFAULTS,
        # every run saves its resolved config into its own log dir; never refuse a rerun
        # ... and sends it (with the git revision) to the logger: kd_lightning/tracking.py
        save_config_callback=TrackingSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_class=KDArgumentParser,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> KDLightningCLI | object:
    """Entry point for the console script, tests and notebooks: ``main(["fit", "-c", ...])``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(help_text())
        return None
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            module, func = EXTRA_COMMANDS[argv[0]].split(":")
            return getattr(importlib.import_module(module), func)(argv[1:])
        return build_cli(args)
    except ConfigError:
        raise
    except Exception as err:  # the one translation point: third-party errors on bad input
        translated = translate(err)
        if translated is None:
            raise
        raise translated from None


#: one line per subcommand for `kd-lightning --help`
COMMAND_HELP: dict[str, str] = {
    "fit": "train a model from a YAML config (LightningCLI)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "run a checkpoint over the predict split",
    "experiment": "run a spec of runs (methods x seeds) and write its results table",
    "compress": "prune / quantise a trained student and report size and accuracy",
    "data": "data tools: `data optimize` (streaming shards), `data store-teacher` (teacher store)",
    "import-teacher": "turn a published teacher checkpoint (e.g. RepDistiller .pth) into ours",
    "lm-eval": "run lm-eval tasks (local ones offline) on an LM checkpoint's student",
}


def help_text() -> str:
    """`kd-lightning --help`: every subcommand, LightningCLI's and ours, one line each."""
    width = max(map(len, COMMAND_HELP))
    lines = ["usage: kd-lightning <command> [-c config.yaml] [--field=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMAND_HELP.items()]
    lines += ["", "`kd-lightning <command> --help` lists the options of one command."]
    return "\n".join(lines)


def console_main() -> None:
    """The installed ``kd-lightning`` script: bad input ends in one clear line, not a traceback."""
    try:
        main()
    except SIGTERMException:
        # pre-empted: PreemptionCheckpoint saved last.ckpt. 143 = 128 + SIGTERM, so a
        # scheduler (or `afterok` dependency) does not take the run for a finished one
        print("kd-lightning: stopped by SIGTERM; resume with --ckpt_path=last", file=sys.stderr)
        raise SystemExit(143) from None
    except Exception as err:
        config_error = _find_config_error(err) or translate(err)
        if config_error is None:
            raise
        print(f"kd-lightning: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind ``err``: jsonargparse re-raises errors from a class's
    ``__init__`` as a ValueError whose ``__cause__`` is the original."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
