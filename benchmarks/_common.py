"""Shared pieces of the benchmark scripts: model pairs, in-memory batches, quiet Trainers,
and ``Interleaved``, the paired step timer (with ``HandScratch`` as a yardstick).

Every benchmark prints *ratios measured in one run on the same machine* (never absolute
targets in pytest). A ratio's two sides are timed step by step, interleaved on the same
batches, and the ratio is a median of per-step (or per-epoch) ratios; each repeat's ratio
is printed, then the median over repeats. Both wall-clock and process-CPU time are
reported; with ``--threads 1`` (the default) CPU time is close to the work actually done.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from kd_lightning.data.mnist import MNIST_MEAN, MNIST_STD
from kd_lightning.machine import machine_line

#: teacher → student pairs the issue asks for
PAIRS: dict[str, dict[str, Any]] = {
    # the quickstart pair on bundled MNIST: LeNet-5 (width 2) → 1×64 MLP
    "mnist": {"teacher": "lenet5", "teacher_kwargs": {"width": 2}, "student": "mlp_tiny",
              "shape": (1, 28, 28), "batch": 64},
    # the classic CIFAR pair (RepDistiller/mdistiller tables)
    "cifar": {"teacher": "resnet56", "teacher_kwargs": {}, "student": "resnet20",
              "shape": (3, 32, 32), "batch": 64},
}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per pair)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p


def setup_threads(n: int) -> None:
    torch.set_num_threads(n)
    torch.manual_seed(0)


def make_batches(shape: tuple[int, ...], batch: int, n: int, num_classes: int = 10) -> list[dict]:
    """``n`` distinct in-memory batches in the kd-lightning batch format."""
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(batch, *shape, generator=g),
            "label": torch.randint(0, num_classes, (batch,), generator=g),
            "index": torch.arange(i * batch, (i + 1) * batch),
            "view": torch.zeros(batch, dtype=torch.long),
        }
        for i in range(n)
    ]


class Batches:
    """An iterable of ready batches for ``Trainer.fit`` (a plain list would be read as a
    list of dataloaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SyntheticData(KDDataModule):
    """Random uint8 images held in memory, in the shape of CIFAR-10 (with its crop + flip
    augmentation and normalisation) or MNIST (no augmentation). No files, no network.

    Args:
        shape: (C, H, W): (3, 32, 32) or (1, 28, 28).
        num_images: size of the official "train" split (val takes ``val_fraction``).
    """

    def __init__(
        self, *args: Any, shape: tuple[int, int, int] = (3, 32, 32), num_images: int = 5000,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.input_shape = tuple(shape)
        self.num_images = num_images
        self.crop_padding_mode = "constant"  # CIFAR10DataModule.augmentations reads it
        cifar = self.input_shape == (3, 32, 32)
        self.mean, self.std = (CIFAR10_MEAN, CIFAR10_STD) if cifar else (MNIST_MEAN, MNIST_STD)

    def augmentations(self) -> list:
        if self.input_shape == (3, 32, 32):
            return CIFAR10DataModule.augmentations(self)
        return []

    def load_arrays(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0 if train else 1)
        n = self.num_images if train else 256
        c, h, w = self.input_shape
        images = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
        return images, torch.randint(0, 10, (n,), generator=g)


def sgd(params):
    """The optimizer of every benchmark (CIFAR recipe): SGD, momentum 0.9, wd 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A Trainer with logging, progress bars, checkpointing, summaries and val off."""
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


@dataclass
class Clock:
    """Wall and process-CPU timestamps."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def tick(self, sync: bool = False) -> None:
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def step_medians(self, skip: int) -> tuple[float, float]:
        """Median wall/CPU seconds between consecutive ticks, after ``skip`` warm-up ticks."""
        def med(ts: list[float]) -> float:
            return statistics.median(b - a for a, b in zip(ts[skip:], ts[skip + 1:]))
        return med(self.wall), med(self.cpu)


class Interleaved(L.Callback):
    """Runs one step of each reference loop on the same batch at the start of every
    Lightning training step, and times both sides. The Lightning step is the time from the
    end of the reference steps to the next ``on_train_batch_start`` (step, hooks, logging,
    next fetch)."""

    def __init__(self, refs: dict[str, Any]) -> None:
        self.refs = refs  # name → object with .step(batch)
        self.ref_times: dict[str, list[tuple[float, float]]] = {name: [] for name in refs}
        self.lightning: list[tuple[float, float]] = []
        self.epochs: list[int] = []  # the training epoch of each Lightning step
        self._mark: tuple[float, float] | None = None  # when the Lightning step began

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def _close_step(self) -> None:
        now = self._now()
        if self._mark is not None:
            self.lightning.append((now[0] - self._mark[0], now[1] - self._mark[1]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close_step()
        self.epochs.append(trainer.current_epoch)
        for name, ref in self.refs.items():
            start = self._now()
            ref.step(batch)
            end = self._now()
            self.ref_times[name].append((end[0] - start[0], end[1] - start[1]))
        self._mark = self._now()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_step()

    def ratios(self, over: str, skip: int, plus: str | None = None) -> tuple[float, float]:
        """Median over steps (after ``skip``) of (Lightning [+ ``plus``]) / ``over``, for
        wall and CPU time."""
        extra = self.ref_times[plus] if plus else [(0.0, 0.0)] * len(self.lightning)
        rows = list(zip(self.lightning, extra, self.ref_times[over]))[skip:]
        return tuple(statistics.median((lt[k] + et[k]) / rt[k] for lt, et, rt in rows) for k in (0, 1))

    def epoch_ratios(self, over: str) -> list[tuple[float, float]]:
        """Per training epoch: Σ Lightning step time / Σ ``over`` step time (wall, CPU). A
        Lightning step's time runs to the next batch, so epoch-end work counts too."""
        out = []
        for epoch in sorted(set(self.epochs)):
            rows = [(lt, rt) for e, lt, rt in zip(self.epochs, self.lightning, self.ref_times[over]) if e == epoch]
            out.append(tuple(sum(lt[k] for lt, _ in rows) / sum(rt[k] for _, rt in rows) for k in (0, 1)))
        return out

    def median_ms(self, name: str | None, skip: int) -> float:
        """Median CPU milliseconds of the Lightning step (``name=None``) or a reference."""
        times = self.lightning if name is None else self.ref_times[name]
        return statistics.median(t[1] for t in times[skip:]) * 1e3


class HandScratch:
    """A yardstick: one hand-written from-scratch step of the student (forward, CE,
    backward, SGD). Timing two Lightning runs against it, interleaved, compares them free
    of the machine's drift between the runs."""

    def __init__(self, pair: dict) -> None:
        from kd_lightning.models import create_model

        self.student = create_model(pair["student"], 10, pair["shape"][0]).train()
        self.optimizer = sgd(self.student.parameters())

    def step(self, batch: dict) -> None:
        loss = torch.nn.functional.cross_entropy(self.student(batch["image"]), batch["label"].clamp_min(0))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def report(name: str, ratios_wall: list[float], ratios_cpu: list[float], target: str) -> None:
    fmt = ", ".join
    print(
        f"{name}: wall {statistics.median(ratios_wall):.3f} "
        f"(repeats {fmt(f'{r:.3f}' for r in ratios_wall)}) | "
        f"cpu {statistics.median(ratios_cpu):.3f} "
        f"(repeats {fmt(f'{r:.3f}' for r in ratios_cpu)}) | target {target}",
        flush=True,
    )


def machine() -> str:
    return machine_line()


def write_result(result: dict[str, Any], out: str | None) -> None:
    """Print a benchmark's result as JSON and, with ``--json``/``--out``, write it to a file
    (the docs render files under docs/results/)."""
    import json
    import sys
    from pathlib import Path

    from kd_lightning.provenance import provenance

    # the command, commit and machine: the file's own command reproduces it
    record = provenance(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])
    result = {**result, "provenance": record}
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
