"""One exception type for bad configuration, so users see a single clear message."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable
from typing import NoReturn


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r} is invalid: {fix}")


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` valid names nearest to ``name``; used in every 'unknown name' error."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not found:  # fall back to substring matches so 'layer9' still suggests 'layer3'
        found = [c for c in choices if name.split(".")[0] in c][:n]
    return found


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose bad input is a one-line ``ConfigError`` (the console script
    prints it and exits 2), not a usage dump. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("command line", message, f"see `{self.prog} --help`")
