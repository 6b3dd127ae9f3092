"""Reading checkpoint files: the one place that turns a missing, truncated or foreign file
into a one-line ``ConfigError`` naming the config field that points at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kd_lightning.errors import ConfigError


def read_checkpoint(path: str | Path, field: str, missing: str = "fix the path", mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` onto the CPU.

    Args:
        path: the file.
        field: the config field or option that named it (for the error line).
        missing: what to do when the file does not exist, e.g. "train the teacher first".
        mmap: memory-map the tensors (large checkpoints read only in part).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(field, str(path), f"no such file: {missing}")
    try:
        # weights_only=False: Lightning checkpoints hold hyper-parameters (dataclasses, paths)
        return torch.load(p, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # truncated zip, random bytes, pickle errors
        raise ConfigError(
            field, str(path),
            f"the file is corrupt or truncated, or not a PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); re-create or re-copy it",
        ) from None
