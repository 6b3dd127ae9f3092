"""The machine a measurement was made on, recorded beside every result a script writes:
a number measured on one machine is not a fact about another."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str | int | None]:
    """CPU model, core count, accelerator, torch/Lightning versions and threads."""
    import lightning

    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }


def machine_line(info: dict | None = None) -> str:
    """``machine_info`` (this machine's, or a recorded one) as one line, for a header or report."""
    if isinstance(info, str):  # older result files recorded the line itself
        return info
    info = info or machine_info()
    gpu = info["cuda"] or "no GPU"
    return (f"{info['cpu_model']}, {info['nproc']} cores ({info['torch_threads']} torch threads), "
            f"{gpu}, torch {info['torch']}, lightning {info['lightning']}")
