"""The LM distiller under FSDP2 on a lent GPU, as one short script (issue 24, "Scale").

Fits ``LMDistillationModule`` (a Llama-shaped student and a teacher twice its width and depth,
random weights, synthetic prompt/completion batches resident on the device) for ``--steps``
optimizer steps after ``--warmup``, in three settings, one process each:

- ``single_bf16_true``: no strategy, ``precision: bf16-true`` (the reference);
- ``fsdp_bf16_true``: Lightning's ``ModelParallelStrategy`` with student *and* teacher
  ``fully_shard``-ed (``configs/trainer/fsdp.yaml``: bf16 weights, activations, gradients);
- ``fsdp_bf16_mixed``: the same with fp32 master weights under bf16 autocast.

Reports completion tokens per second (the tokens the loss is taken over), all tokens per
second, peak allocated GPU memory, the last loss and the dtype of the student's and
teacher's parameters. On one GPU FSDP holds whole models (a mesh of 1): this checks that
the sharded path runs end to end in bf16 and what it costs, not the multi-GPU scaling.
Without CUDA it stops with exit status 2 unless ``--accelerator cpu`` (a smoke run).

    python -m benchmarks.gpu_lm_fsdp --out docs/results/gpu_lm_fsdp.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch

SIZES = {  # hidden, intermediate, layers, heads
    "student": (1024, 2816, 8, 16),
    "teacher": (2048, 5632, 16, 16),
}


def llama_kwargs(hidden: int, inter: int, layers: int, heads: int) -> dict[str, int]:
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }


class Timer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the fit (device synced)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.seconds = warmup, 0.0, 0.0
        self.loss = float("nan")

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(module)
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)

    def on_train_end(self, trainer, module) -> None:
        self._sync(module)
        self.seconds = time.perf_counter() - self.t0


def batches(n: int, batch: int, length: int, vocab: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 2] = -100  # the first half is the prompt
        out.append(
            {
                k: v.to(device)
                for k, v in {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "labels": labels,
                }.items()
            }
        )
    return out


def run(setting: str, args: argparse.Namespace, teacher_dir: str) -> dict[str, Any]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from benchmarks._common import Batches, quiet_trainer
    from kd_lightning.losses.lm import TokenCrossEntropy, TokenDivergence
    from kd_lightning.modules.lm_distillation import LMDistillationModule
    from kd_lightning.modules.teacher import TeacherSpec

    s = SIZES["student"] if args.accelerator == "gpu" else (32, 64, 2, 2)
    torch.manual_seed(0)
    module = LMDistillationModule(
        "llama",
        llama_kwargs(*s),
        TeacherSpec(model=f"hf:{teacher_dir}"),
        heads=[TokenDivergence(0.5, divergence="jsd", beta=0.5), TokenCrossEntropy(0.5)],
        num_classes=args.vocab,
        chunk_size=0,
        generate_samples=0,
    )
    fsdp = setting.startswith("fsdp")
    strategy: Any = (
        ModelParallelStrategy(
            data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
        if fsdp
        else "auto"
    )
    precision = "bf16-true" if setting.endswith("bf16_true") else "bf16-mixed"
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    data = batches(args.warmup + args.steps, args.batch, args.length, args.vocab, device)
    timer = Timer(args.warmup)
    trainer = quiet_trainer(
        accelerator=args.accelerator,
        strategy=strategy,
        precision=precision,
        max_steps=args.warmup + args.steps,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=Batches(data))
    completion = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data[args.warmup :])
    total = args.steps * args.batch * args.length
    from kd_lightning.modules.sharding import is_sharded

    return {
        "strategy": type(trainer.strategy).__name__,
        "precision": precision,
        "student_sharded": is_sharded(module.student),
        "teacher_sharded": is_sharded(module.teacher),
        "student_dtype": str(next(module.student.parameters()).dtype),
        "teacher_dtype": str(next(module.teacher.parameters()).dtype),
        "seconds": round(timer.seconds, 3),
        "completion_tokens_per_s": round(completion / timer.seconds, 1),
        "tokens_per_s": round(total / timer.seconds, 1),
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None
        ),
        "last_loss": round(timer.loss, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--settings", nargs="+", default=["single_bf16_true", "fsdp_bf16_true", "fsdp_bf16_mixed"]
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print(
            "gpu_lm_fsdp: no CUDA device here; run it on a GPU machine "
            "(a CPU smoke run: --accelerator cpu; the CPU FSDP test: tests/test_lm_fsdp.py)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from benchmarks._common import write_result
    from kd_lightning.modules.lm_distillation import CausalLMModule

    t = SIZES["teacher"] if args.accelerator == "gpu" else (64, 128, 2, 2)
    with tempfile.TemporaryDirectory() as teacher_dir:
        torch.manual_seed(1)
        CausalLMModule("llama", llama_kwargs(*t), num_classes=args.vocab).model.save_pretrained(
            teacher_dir
        )
        rows = {name: run(name, args, teacher_dir) for name in args.settings}
    write_result(
        {
            "device_name": (torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu"),
            "student": dict(zip(("hidden", "intermediate", "layers", "heads"), SIZES["student"]))
            if args.accelerator == "gpu"
            else "tiny",
            "teacher": dict(zip(("hidden", "intermediate", "layers", "heads"), SIZES["teacher"]))
            if args.accelerator == "gpu"
            else "tiny",
            "batch": args.batch,
            "length": args.length,
            "vocab": args.vocab,
            "warmup": args.warmup,
            "steps": args.steps,
            "settings": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
