"""The one place where exceptions from code we do not own become a one-line ``ConfigError``.

``kd_lightning.cli.main`` passes every exception through :func:`translate`. Known failures of
bad user input (a ConfigError re-raised by torch from a DataLoader worker, Lightning refusing
an accelerator, a torch optimizer refusing a hyper-parameter, a corrupt data file read by
json / pyarrow / PIL / datasets / litdata) come back as the ConfigError naming the field the
user set; anything else returns ``None`` and keeps its traceback.
"""

from __future__ import annotations

import json
import re

from kd_lightning.errors import ConfigError

#: torch.optim's checks ("Invalid learning rate: nan") → the config field that set the value
_OPTIMIZER_CHECKS = {
    "Invalid learning rate": "lr",
    "Invalid momentum value": "momentum",
    "Invalid weight_decay value": "weight_decay",
    "Invalid epsilon value": "eps",
    "Invalid beta parameter": "betas",
    "Invalid rho value": "rho",
    "Invalid alpha value": "alpha",
}
#: the line torch's ExceptionWrapper keeps from a worker's ConfigError traceback
_WORKER_CONFIG_ERROR = re.compile(r"^kd_lightning\.errors\.ConfigError: (.+)$", re.M)
_CONFIG_LINE = re.compile(r"^(?P<field>\S+?)=(?P<value>.*?) is invalid: (?P<fix>.*)$", re.S)
_LAST_LINE_OF_WORKER = re.compile(r"^(?P<type>[\w.]+(?:Error|Exception)): (?P<msg>.+)$", re.M)


def from_line(line: str) -> ConfigError:
    """A ConfigError rebuilt from its own one-line message (``field=value is invalid: fix``)."""
    match = _CONFIG_LINE.match(line.strip())
    if match is None:
        return ConfigError("data", "…", line.strip())
    err = ConfigError(match["field"], None, match["fix"])
    err.args = (line.strip(),)  # keep the value exactly as first printed
    return err


def translate(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err`` (or the one it stands for), else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _translate_one(current)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _translate_one(err: BaseException) -> ConfigError | None:
    if isinstance(err, ConfigError):
        return err
    message = str(err)
    if "in DataLoader worker process" in message:
        return _from_worker(message)
    lightning_check = type(err).__name__ == "MisconfigurationException"
    if lightning_check and "No supported gpu backend" in message:
        return ConfigError(
            "trainer.accelerator",
            "gpu",
            "this machine has no GPU; use `trainer.accelerator=auto` (or cpu)",
        )
    if lightning_check and "can not run on your system" in message:
        return ConfigError(
            "trainer.accelerator",
            _accelerator_of(message),
            "this machine has no such device; use `trainer.accelerator=auto` (or cpu)",
        )
    if isinstance(err, ValueError):
        for prefix, name in _OPTIMIZER_CHECKS.items():
            if message.startswith(prefix):
                value = message.split(":", 1)[1].strip() if ":" in message else "?"
                return ConfigError(
                    f"model.init_args.optimizer.init_args.{name}",
                    value,
                    "torch.optim refuses it; use a finite, non-negative number",
                )
    if isinstance(err, json.JSONDecodeError):
        return ConfigError(
            "data",
            "a JSON file",
            f"it is not valid JSON ({err.msg} at line {err.lineno});"
            " rewrite it, e.g. with `kd-lightning data optimize --overwrite`",
        )
    return None


def _from_worker(message: str) -> ConfigError | None:
    """torch re-raises a worker's exception as its first line plus the formatted traceback."""
    found = _WORKER_CONFIG_ERROR.findall(message)
    if found:
        return from_line(found[-1])
    last = _LAST_LINE_OF_WORKER.findall(message)
    if last and last[-1][0].split(".")[-1] in ("UnidentifiedImageError", "DecompressionBombError"):
        return ConfigError(
            "data.data_dir", last[-1][1], "an image cannot be decoded; remove or re-save it"
        )
    return None


def _accelerator_of(message: str) -> str:
    match = re.search(r"`(\w+)Accelerator`", message)
    return match[1].lower().replace("cuda", "gpu") if match else "?"
