"""How far a bf16 teacher's soft targets are from the fp32 teacher's (issue 25).

The trained quickstart teacher (LeNet-5 width 2 on the bundled MNIST digits) on the test
split, once in fp32 and once under bf16 autocast (``teacher_precision: bf16``): the mean
over test images of KL(p_fp32 ‖ p_bf16) at T = 4 (the KD head's temperature; also T = 1),
the share of images whose top-1 class agrees, and the largest logit difference.

    kd-lightning fit -c configs/quickstart/teacher.yaml
    python -m benchmarks.teacher_precision_agreement --teacher runs/quickstart/teacher/best.ckpt \\
        --out docs/results/teacher_precision_kl.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks._common import write_result
from kd_lightning.data import BundledMNISTDataModule
from kd_lightning.machine import machine_info
from kd_lightning.modules.performance import cpu_bf16_flags
from kd_lightning.modules.teacher import TeacherSpec, build_teacher


def kl_mean(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> float:
    """Mean over rows of KL(softmax(p/T) ‖ softmax(q/T)) (no T² factor: the divergence itself)."""
    log_p = F.log_softmax(p_logits / temperature, 1)
    log_q = F.log_softmax(q_logits / temperature, 1)
    return float(F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="runs/quickstart/teacher/best.ckpt")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dm = BundledMNISTDataModule(eval_batch_size=500, seed=0)  # the quickstart's split
    dm.setup("test")
    teacher = build_teacher(TeacherSpec(checkpoint=args.teacher), dm.num_classes, 1, "teacher")
    full, half, labels = [], [], []
    with torch.inference_mode():
        for batch in dm.test_dataloader():
            full.append(teacher(batch["image"]).float())
            with torch.autocast("cpu", dtype=dtype):
                half.append(teacher(batch["image"]).float())
            labels.append(batch["label"])
    a, b, y = torch.cat(full), torch.cat(half), torch.cat(labels)
    result = {
        "what": f"quickstart teacher (lenet5 width 2), test split, fp32 vs {args.dtype} autocast",
        "teacher": args.teacher,
        "test_images": len(y),
        "kl_fp32_to_half_T4_mean": kl_mean(a, b, 4.0),
        "kl_fp32_to_half_T1_mean": kl_mean(a, b, 1.0),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
        "max_abs_logit_diff": float((a - b).abs().max()),
        "teacher_acc_fp32": float((a.argmax(1) == y).float().mean()),
        "teacher_acc_half": float((b.argmax(1) == y).float().mean()),
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        "machine": machine_info(),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
