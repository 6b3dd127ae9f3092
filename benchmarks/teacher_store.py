"""The on-disk teacher store (``kd_lightning.modules.teacher_store``): size, read speed, top-k KL.

Measures, on this machine, for each k:

* bytes on disk per (sample, view): fp16 values + int16 class ids + a fill flag;
* read speed: images/s of ``TeacherStore.read`` (memory-mapped gather + reconstruction of
  dense logits) for random batches from a store of ``--store-samples`` entries, against
  images/s of the teacher's forward on the same batch size (interleaved, median of repeats);
* KL(full ‖ top-k) of the teacher's distribution vs the stored one (top-k + uniform
  remainder), at T = 1 and at the KD temperature T = 4, mean over ``--kl-images`` images.

The KL depends on how peaked the teacher is: pass a trained teacher (``--weights``, e.g.
torchvision's resnet34-b627a593.pth) and real images (``--data-dir``, an ImageFolder val
split). Without them (no internet here) the teacher is untrained and the images random,
which the JSON records as ``teacher_trained: false``.

    python -m benchmarks.teacher_store --out docs/results/teacher_store_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import write_result
from kd_lightning.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from kd_lightning.losses.outputs import ModelOutput
from kd_lightning.machine import machine_info
from kd_lightning.modules.teacher import TeacherSpec, build_teacher
from kd_lightning.modules.teacher_store import TeacherStore, reconstruct_logits, topk_logprobs


class _Data:
    """Just what ``TeacherStore.bind`` reads from a DataModule."""

    augments_randomly = False
    augment, augment_views = True, 1

    def __init__(self, n: int) -> None:
        self.train_set = self.val_set = _Sized(n)
        self.augmentation_signature = {"benchmark": True}

    def setup(self, stage: str) -> None:
        pass


class _Sized:
    def __init__(self, n: int) -> None:
        self.labels = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Set an untrained network's BatchNorm running statistics from a few batches (cumulative
    average), as training would. Without this, eval-mode BN of a fresh network normalises
    with mean 0 / var 1, activations grow layer by layer and the step times measure
    denormal/overflow arithmetic and one-hot outputs instead of a real teacher."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    torch.nn.Module.train(model, True)  # frozen teachers ignore .train(); BN needs train mode
    for x in batches:
        model(x)
    torch.nn.Module.train(model, False)


def images(args: argparse.Namespace, n: int) -> torch.Tensor:
    if args.data_dir:
        dm = ImageFolderDataModule(args.data_dir, val_dir=args.val_dir, num_workers=0, batch_size=n)
        dm.setup("fit")
        return torch.stack([dm.val_set[i]["image"] for i in range(min(n, len(dm.val_set)))])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), generator=g).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def kl_topk(logits: torch.Tensor, k: int, temperature: float) -> float:
    """Mean KL(p ‖ q) of the teacher's softmax at T and the stored top-k reconstruction at T."""
    values, classes = topk_logprobs(logits, k)
    rebuilt = reconstruct_logits(values.half().float(), classes, logits.shape[-1])  # as stored (fp16)
    p = F.log_softmax(logits / temperature, -1)
    q = F.log_softmax(rebuilt / temperature, -1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="tv:resnet34")
    p.add_argument("--weights", default=None, help="a state_dict file for the teacher")
    p.add_argument("--data-dir", default=None, help="an ImageFolder root for real images")
    p.add_argument("--val-dir", default="val")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--kl-images", type=int, default=64)
    p.add_argument("--store-samples", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher = build_teacher(TeacherSpec(model=args.teacher, weights=args.weights), args.num_classes, 3, "teacher")
    x = images(args, max(args.kl_images, args.batch))
    if args.weights is None:
        calibrate_bn(teacher, [x[:8]])
    with torch.inference_mode():
        logits = torch.cat([teacher(x[i : i + args.batch]) for i in range(0, args.kl_images, args.batch)])
    result: dict = {
        "machine": machine_info(), "teacher": args.teacher, "teacher_trained": args.weights is not None,
        "images": "ImageFolder " + args.data_dir if args.data_dir else "random uniform pixels",
        "num_classes": args.num_classes, "batch": args.batch, "image_size": args.image_size,
        "threads": args.threads, "store_samples": args.store_samples, "per_k": {},
    }
    batch = x[: args.batch]
    for k in args.ks:
        with tempfile.TemporaryDirectory() as tmp:
            store = TeacherStore(tmp, k=k).bind(_Data(args.store_samples), args.num_classes, ["bench"])
            # fill every row (the teacher's logits, tiled): reads then touch a full-size store
            chunk = logits.repeat((4096 + len(logits) - 1) // len(logits), 1)[:4096]
            for start in range(0, args.store_samples, 4096):
                idx = torch.arange(start, min(start + 4096, args.store_samples))
                store.write("train", idx, torch.zeros_like(idx), [ModelOutput(chunk[: len(idx)], {})])
            store.flush()
            disk = sum(f.stat().st_size for f in Path(tmp).glob("train_*.npy"))
            t_forward, t_read = [], []
            g = torch.Generator().manual_seed(k)
            for _ in range(args.repeats):  # interleaved: forward, read, forward, read …
                t0 = time.perf_counter()
                with torch.inference_mode():
                    teacher(batch)
                t_forward.append(time.perf_counter() - t0)
                idx = torch.randint(0, args.store_samples, (args.batch,), generator=g)
                t0 = time.perf_counter()
                store.read("train", idx, torch.zeros_like(idx))
                t_read.append(time.perf_counter() - t0)
            fwd, rd = statistics.median(t_forward), statistics.median(t_read)
            result["per_k"][str(k)] = {
                "bytes_per_entry": store.nbytes_per_entry(),
                "disk_bytes_per_sample": round(disk / args.store_samples, 2),
                "imagenet_1view_GB": round(store.nbytes_per_entry() * 1_281_167 / 1e9, 3),
                "teacher_forward_images_per_s": round(args.batch / fwd, 1),
                "store_read_images_per_s": round(args.batch / rd, 1),
                "read_speedup": round(fwd / rd, 1),
                "kl_full_topk_T1": kl_topk(logits, k, 1.0),
                "kl_full_topk_T4": kl_topk(logits, k, 4.0),
            }
            print(k, result["per_k"][str(k)], flush=True)
    result["teacher_mean_max_prob"] = float(F.softmax(logits, -1).max(-1).values.mean())
    write_result(result, args.out)


if __name__ == "__main__":
    main()
