"""Checks that run before a fit touches anything, and one-line errors for CLI typos.

* A log or checkpoint directory that cannot be written fails at the first save — after an
  epoch of work — and, for loggers, with a bare ``PermissionError``. ``check_run_dirs``
  probes every directory a fit will write to before the first step and names the config
  field to fix.
* jsonargparse answers an unknown ``model``/``data`` class or init argument with a usage
  dump and a nested union error; ``parser_error`` turns those into a ``ConfigError`` with
  the closest valid names.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import uuid
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.errors import ConfigError, closest


def ensure_writable(path: str | os.PathLike, field: str) -> None:
    """Create ``path`` if needed and write (then delete) a probe file in it."""
    target = Path(path)
    if "://" in str(path):  # remote (s3://, gs://, …): fsspec checks at the first save
        return
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".kd-write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            field, str(path),
            f"cannot write there ({err.strerror or err}); pick a directory you can write to",
        ) from None


def check_run_dirs(trainer: L.Trainer) -> None:
    """Probe every logger's ``save_dir`` and every checkpoint ``dirpath`` of ``trainer``.

    Field names follow the kd-lightning CLI (``trainer.logger…``, ``checkpoint.dirpath``).
    """
    loggers = trainer.loggers
    for i, logger in enumerate(loggers):
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            where = "trainer.logger" if len(loggers) == 1 else f"trainer.logger[{i}]"
            ensure_writable(save_dir, f"{where}.init_args.save_dir")
    for cb in trainer.callbacks:
        dirpath = getattr(cb, "dirpath", None)
        if dirpath:
            field = "checkpoint.dirpath" if isinstance(cb, ModelCheckpoint) else (
                f"{type(cb).__name__}.dirpath"
            )
            ensure_writable(dirpath, field)


# -- one-line errors for the commonest CLI typos ---------------------------------------------
_KEY = re.compile(r'Parser key "(?P<key>[\w.]+)"')
_GIVEN = re.compile(r"^\s*Given value: (?P<value>\S+)\s*$", re.M)
_BAD_IMPORT = (
    re.compile(r"has no attribute '"),
    re.compile(r"No module named '"),
    re.compile(r"Expected a dot import path string"),
)
_BAD_OPTION = re.compile(
    r"Problem with given class_path '(?P<cls>[\w.]+)':\s*Option '(?P<opt>\w+)' is not accepted"
)
#: where kd-lightning's own classes live, for "closest name" suggestions
_PACKAGES = {"model": "kd_lightning.modules", "data": "kd_lightning.data"}


def _known_classes(key: str) -> list[str]:
    package = importlib.import_module(_PACKAGES[key])
    base = L.LightningModule if key == "model" else L.LightningDataModule
    return [
        f"{package.__name__}.{name}" for name, obj in vars(package).items()
        if isinstance(obj, type) and issubclass(obj, base)
    ]


def parser_error(message: str) -> ConfigError | None:
    """Turn jsonargparse's error for an unknown ``model``/``data`` class or an unknown init
    argument into a ConfigError with the closest valid names; None for anything else."""
    key = _KEY.search(message)
    if key is None or key["key"] not in _PACKAGES:
        return None
    field = key["key"]
    option = _BAD_OPTION.search(message)
    if option:
        try:
            module, _, name = option["cls"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        except Exception:
            params = []
        return ConfigError(
            f"{field}.init_args.{option['opt']}", "…",
            f"{option['cls']} takes no argument {option['opt']!r}. Closest: "
            f"{closest(option['opt'], params) or 'none'}",
        )
    given = _GIVEN.findall(message)
    if not given or not any(p.search(message) for p in _BAD_IMPORT):
        return None
    value = given[-1]
    known = _known_classes(field)
    short = {k.rsplit(".", 1)[-1]: k for k in known}
    nearest = [short[n] for n in closest(value.rsplit(".", 1)[-1], short)]
    kind = "LightningModule" if field == "model" else "LightningDataModule"
    return ConfigError(
        field, value,
        f"no {kind} can be imported from that class_path. Closest: {nearest or 'none'}. "
        f"Built in: {sorted(known)}; your own classes need a full import path (my_pkg.MyModule)",
    )
