"""The ImageNet-shaped KD training step: live teacher vs the on-disk teacher store.

resnet34 → resnet18 (torchvision definitions, 1000 classes), mdistiller's ImageNet KD loss
(0.5·CE + 0.5·KL, T = 1), SGD. Each step takes a batch of synthetic JPEG-encoded images
through the ImageNet on-device path (``DeviceImageAugment``: decode, RandomResizedCrop
224, flip, normalise, on the training device), then either runs the teacher (*live*) or
reads its stored top-k outputs (``TeacherStore``, k = 20, fp16; *store*), then the student
forward, the loss, backward and the optimizer step. The two variants alternate step by
step on the same batches; the script prints images/s of each and the ratio
store/live (median of per-step ratios).

On a GPU it also times bf16-mixed + channels_last, with ``torch.compile`` off and on.

    python -m benchmarks.imagenet_step --batch 256                  # GPU: the issue's setting
    python -m benchmarks.imagenet_step --batch 8 --steps 4 --out docs/results/imagenet_step_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks._common import write_result
from benchmarks.teacher_store import _Data, calibrate_bn
from kd_lightning.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, CropSpec, DeviceImageAugment
from kd_lightning.losses.outputs import ModelOutput
from kd_lightning.machine import machine_info
from kd_lightning.models import create_model
from kd_lightning.modules.teacher import freeze
from kd_lightning.modules.teacher_store import TeacherStore


def encoded_batches(n: int, batch: int, size: int = 320) -> list[list[torch.Tensor]]:
    """``n`` batches of distinct random JPEGs (ImageNet-like size), encoded once."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        # smooth random images (upsampled noise) compress like photos, unlike pure noise
        low = torch.randint(0, 256, (batch, 3, size // 8, size // 8), generator=g, dtype=torch.uint8)
        img = F.interpolate(low.float(), size=(size, size), mode="bilinear").to(torch.uint8)
        out.append([encode_jpeg(im, quality=90) for im in img])
    return out


def run(args: argparse.Namespace, device: torch.device, bf16: bool, channels_last: bool, compile_: bool) -> dict:
    torch.manual_seed(0)
    student = create_model("tv:resnet18", 1000, 3).to(device)
    teacher = create_model("tv:resnet34", 1000, 3)
    calibrate_bn(teacher, [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))])
    teacher = freeze(teacher).to(device)
    if channels_last:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    if compile_:
        student.compile()
        teacher.compile()
    opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    augment = DeviceImageAugment(CropSpec(), IMAGENET_MEAN, IMAGENET_STD, seed=0)
    batches = encoded_batches(args.steps + args.warmup, args.batch)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    n = len(batches) * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        store = TeacherStore(tmp, k=args.k).bind(_Data(n), 1000, ["bench"])

        def step(i: int, live: bool) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            index = torch.arange(i * args.batch, (i + 1) * args.batch, device=device)
            view = torch.zeros_like(index)
            x = augment([b.to(device, non_blocking=True) for b in batches[i]], index, view)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            label = torch.randint(0, 1000, (args.batch,), device=device)
            with amp:
                if live:
                    with torch.inference_mode():
                        t_logits = teacher(x).float().clone()
                else:
                    t_logits = store.read("train", index, view, device)[0].logits
                s_logits = student(x).float()
            loss = 0.5 * F.cross_entropy(s_logits, label) + 0.5 * F.kl_div(
                F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean"
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        # fill the store with the teacher's outputs on exactly these views (what
        # `kd-lightning data store-teacher` does ahead of training)
        for i, b in enumerate(batches):
            index = torch.arange(i * args.batch, (i + 1) * args.batch, device=device)
            x = augment([t.to(device) for t in b], index, torch.zeros_like(index))
            with torch.inference_mode(), amp:
                store.write("train", index, torch.zeros_like(index), [ModelOutput(teacher(x).float(), {})])
        for i in range(args.warmup):
            step(i, True)
            step(i, False)
        live, stored = [], []
        for i in range(args.warmup, len(batches)):
            live.append(step(i, True))
            stored.append(step(i, False))
    ratios = [a / b for a, b in zip(live, stored)]
    return {
        "bf16": bf16, "channels_last": channels_last, "compile": compile_,
        "live_images_per_s": round(args.batch / statistics.median(live), 2),
        "store_images_per_s": round(args.batch / statistics.median(stored), 2),
        "store_speedup_median_of_step_ratios": round(statistics.median(ratios), 3),
        "step_ratios": [round(r, 3) for r in ratios],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = [(False, False, False)]
    if device.type == "cuda":
        settings += [(True, True, False), (True, True, True)]
    result = {"machine": machine_info(), "device": str(device), "batch": args.batch, "k": args.k,
              "threads": torch.get_num_threads(), "runs": []}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    for bf16, cl, comp in settings:
        row = run(args, device, bf16, cl, comp)
        print(row, flush=True)
        result["runs"].append(row)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
