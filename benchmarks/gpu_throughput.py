"""GPU training throughput (images/s) of resnet56 → resnet20 KD at batch 512.

Configurations: fp32 baseline, then bf16-mixed with channels_last, with ``torch.compile``
off and on (teacher and student), plus the from-scratch student and the cached-teacher KD
for reference. Two input modes:

* ``resident``: batches already on the GPU (pure model throughput);
* ``pipeline``: the real data path: uint8 CIFAR-10-shaped images in host memory, pinned,
  copied per batch and cropped/flipped/normalised on the GPU (``augment_on_device``).

Times cover ``--steps`` steps after ``--warmup`` steps (compilation happens in the warm-up),
bracketed by ``torch.cuda.synchronize()``. Skips cleanly (exit 0) without CUDA.

Run:  python -m benchmarks.gpu_throughput [--batch 512] [--steps 50] [--modes resident pipeline]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import lightning as L
import torch

from benchmarks._common import Batches, Clock, SyntheticData, make_batches, quiet_trainer, sgd
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import TeacherSpec

CONFIGS: list[dict[str, Any]] = [
    {"name": "KD fp32", "precision": "32-true", "channels_last": False, "compile": False},
    {"name": "KD bf16 + channels_last", "precision": "bf16-mixed", "channels_last": True, "compile": False},
    {"name": "KD bf16 + channels_last + compile", "precision": "bf16-mixed", "channels_last": True,
     "compile": True},
    {"name": "KD bf16 + channels_last + teacher cache", "precision": "bf16-mixed",
     "channels_last": True, "compile": False, "cache": True},
    {"name": "scratch student bf16 + channels_last", "precision": "bf16-mixed", "channels_last": True,
     "compile": False, "scratch": True},
]


class SyncedStepClock(L.Callback):
    """Ticks (after a CUDA sync) when step ``warmup`` starts and when training ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.clock = warmup, Clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and not self.clock.wall:
            self.clock.tick(sync=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.clock.tick(sync=True)


def build(cfg: dict[str, Any]) -> L.LightningModule:
    if cfg.get("scratch"):
        module = ClassifierModule(model="resnet20", num_classes=10, input_shape=(3, 32, 32),
                                  optimizer=sgd)
        if cfg["channels_last"]:  # as DistillationModule's switch does: weights and inputs
            module.model.to(memory_format=torch.channels_last)
            module.model.register_forward_pre_hook(
                lambda m, a: (a[0].contiguous(memory_format=torch.channels_last),)
            )
        return module
    return DistillationModule(
        student="resnet20", teacher=TeacherSpec(model="resnet56", allow_untrained=True), num_classes=10,
        input_shape=(3, 32, 32), optimizer=sgd,
        performance=Performance(
            teacher_cache="memory" if cfg.get("cache") else "off",
            channels_last=cfg["channels_last"], compile="both" if cfg["compile"] else "none",
        ),
    )


def run(cfg: dict[str, Any], mode: str, args: argparse.Namespace) -> float:
    steps = args.warmup + args.steps
    clock = SyncedStepClock(args.warmup)
    if cfg.get("cache"):  # the timed steps must all be cache hits: repeat the warm-up batches
        steps = 2 * args.warmup
    trainer = quiet_trainer(accelerator=args.accelerator, devices=1, precision=cfg["precision"],
                            max_steps=steps, max_epochs=-1, callbacks=[clock])
    module = build(cfg)
    if mode == "resident":
        batches = make_batches((3, 32, 32), args.batch, args.warmup)
        if args.accelerator == "gpu":
            batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
        n = steps // args.warmup + 1
        trainer.fit(module, train_dataloaders=Batches((batches * n)[:steps]))
    else:
        # an epoch is shorter than the warm-up, so the cache is full when timing starts
        data = SyntheticData(
            num_images=int(args.batch * (args.warmup - 1) / 0.9), batch_size=args.batch,
            augment_on_device=True, augment_views=1 if cfg.get("cache") else 0,
            pin_memory=args.accelerator == "gpu", num_workers=args.workers,
        )
        trainer.fit(module, data)
    timed = (steps - args.warmup) * args.batch
    return timed / (clock.clock.wall[-1] - clock.clock.wall[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (pipeline mode)")
    p.add_argument("--modes", nargs="+", default=["resident", "pipeline"],
                   choices=["resident", "pipeline"])
    p.add_argument("--skip-compile", action="store_true",
                   help="leave out the torch.compile configuration (its compilation takes minutes)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"],
                   help="cpu: a dry run that checks the script itself (use a tiny --batch)")
    args = p.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print("gpu_throughput: CUDA is not available on this machine; skipping.")
        sys.exit(0)
    torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU dry run"
    print(f"{device}, torch {torch.__version__}, lightning {L.__version__}, "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up")
    results = []
    for mode in args.modes:
        for cfg in CONFIGS:
            if args.skip_compile and cfg["compile"]:
                continue
            rates = [run(cfg, mode, args) for _ in range(args.repeats)]
            results.append({"mode": mode, **cfg, "img_per_s": rates})
            print(f"[{mode}] {cfg['name']}: {statistics.median(rates):,.0f} img/s "
                  f"(repeats {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
