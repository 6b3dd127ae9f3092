"""The issue-25 rows on a lent GPU, as one short script (CUDA only).

1. kd-lightning against torchdistill 1.1.5 on resnet56 → resnet20 at batch 64
   (``benchmarks.peer_torchdistill --device cuda``: torchdistill, kd-lightning defaults,
   fp32 with folding only, bf16-mixed), one process per run, interleaved rounds;
2. one CIFAR-shaped KD epoch (50,000 images, batch ``--batch``) with the data resident on
   the GPU: ``Trainer.fit`` of a ``DistillationModule`` with the defaults,
   ``teacher_precision: auto`` and ``precision: bf16-mixed``, wall time of the epoch.

The result file names the device. Without CUDA it stops at once with exit status 2.

    python -m benchmarks.gpu_teacher_speed --out docs/results/gpu_teacher_speed.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def epoch_seconds(batch: int, images: int, precision: str, teacher_precision: str) -> float:
    from benchmarks._common import Batches, quiet_trainer, sgd
    from benchmarks.peer_torchdistill import CLASSES, _batches, make_teacher_weights
    from kd_lightning.losses import CrossEntropy, KLDivergence
    from kd_lightning.modules import DistillationModule
    from kd_lightning.modules.performance import Performance
    from kd_lightning.modules.teacher import TeacherSpec

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "resnet56.pt")
        make_teacher_weights(weights)
        module = DistillationModule(
            student="resnet20", teacher=TeacherSpec(model="resnet56", weights=weights),
            num_classes=CLASSES, input_shape=(3, 32, 32),
            heads=[CrossEntropy(0.1), KLDivergence(0.9, temperature=4.0)],
            performance=Performance(teacher_precision=teacher_precision), optimizer=sgd,
        )
    module.configure_optimizers = lambda: sgd(module.student.parameters())
    data = _batches(images // batch, batch, "cuda")  # resident: no host→device copies
    warm = quiet_trainer(accelerator="gpu", max_steps=5, precision=precision)
    warm.fit(module, train_dataloaders=Batches(data[:5]))  # cuDNN/autotune outside the timing
    trainer = quiet_trainer(accelerator="gpu", max_epochs=1, precision=precision)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=Batches(data))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_teacher_speed: no CUDA device here; run it on a GPU machine "
              "(the CPU rows: python -m benchmarks.peer_torchdistill)", file=sys.stderr)
        raise SystemExit(2)
    from benchmarks._common import write_result
    from benchmarks.peer_torchdistill import parser, run_rounds

    peer_args = parser().parse_args(["--device", "cuda", "--rounds", str(args.rounds),
                                     "--steps", str(args.steps), "--threads", "4"])
    result = {
        "device_name": torch.cuda.get_device_name(),
        "peer_torchdistill": run_rounds(peer_args, list(peer_args.settings)),
        "kd_epoch_resident": {
            "batch": args.batch, "images": args.images,
            "s_fp32": round(epoch_seconds(args.batch, args.images, "32-true", "fp32"), 2),
            "s_bf16_mixed_teacher_auto": round(
                epoch_seconds(args.batch, args.images, "bf16-mixed", "auto"), 2),
        },
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
