"""On-policy distillation (GKD λ = 1) with the student's completions from ``engine: hf`` vs
``engine: vllm`` on a lent GPU (issue 24), as one short script.

One fit of ``LMDistillationModule`` (a Llama-shaped student and a teacher twice its width
and depth, random weights, ``bf16-mixed``; synthetic prompts of varied lengths resident on
the device): every step generates the batch's completions with *both* engines from the same
student weights, in alternating order (paired and interleaved step by step), each timed
between ``torch.cuda.synchronize`` calls (vLLM's weight copy timed apart), and trains on
one of them (alternating), so the rest of the step (teacher and student forward, backward,
optimizer) is timed once and shared: a step with engine e costs ``gen_e + sync_e + rest``.
After ``--warmup`` steps it reports the median per-step ratios (hf step / vllm step,
hf generation / vllm generation), the median seconds of each part, and the vLLM engine's
build seconds (once, before training).

It also checks the weight sync: before training and after the last optimizer step, each
engine completes fixed prompts greedily and the student scores them under teacher forcing
(fp32): the share of generated tokens that are the student's own argmax. hf's share is the
reference (1 up to KV-cache numerics); vLLM's is close to it when the weights were copied in
(bf16 near-ties aside) and near 1/vocab when they were not (its engine starts from random
``dummy`` weights). Without CUDA or vllm it stops with one line and exit status 2;
``--accelerator cpu`` is a smoke run of the same loop with hf in both seats.

    python -m benchmarks.gpu_vllm_onpolicy --out docs/results/gpu_vllm_onpolicy.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
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
TINY = {"student": (32, 64, 2, 2), "teacher": (64, 128, 2, 2)}


def llama_kwargs(hidden: int, inter: int, layers: int, heads: int) -> dict[str, int]:
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }


def prompt_batches(
    n: int, batch: int, prompt: int, vocab: int, device: str, seed: int = 0
) -> list[dict]:
    """Rows of a prompt (``prompt // 2`` to ``prompt`` tokens, never the special ids 0-2) and
    an 8-token dataset completion, right-padded (the dataset's layout)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(prompt // 2, prompt + 1, (batch,), generator=g).tolist()
        width = max(lens) + 8
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        attention = torch.zeros_like(ids)
        for i, k in enumerate(lens):
            ids[i, : k + 8] = torch.randint(3, vocab, (k + 8,), generator=g)
            labels[i, k : k + 8] = ids[i, k : k + 8]
            attention[i, : k + 8] = 1
        batch_ = {"input_ids": ids, "attention_mask": attention, "labels": labels}
        out.append({k: v.to(device) for k, v in batch_.items()})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired_module(second: str, **kwargs: Any):
    from kd_lightning.modules.lm_distillation import LMDistillationModule, pack_sequences

    class PairedEngines(LMDistillationModule):
        """Generates each batch with both engines (see the module docstring)."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.second = second
            self.records: list[dict[str, Any]] = []
            self.checks: dict[str, dict[str, float]] = {}
            self.build_s = float("nan")

        def seats(self) -> dict[str, tuple[Any, str]]:
            spec = self.on_policy
            return {
                "hf": (dataclasses.replace(spec, engine="hf"), "model.on_policy"),
                "vllm": (dataclasses.replace(spec, engine=second), f"bench.{second}_seat"),
            }

        def generate_completions(self, batch):
            order = ["hf", "vllm"] if self.global_step % 2 == 0 else ["vllm", "hf"]
            record: dict[str, Any] = {"step": self.global_step, "first": order[0]}
            made = {}
            for seat in order:
                spec, field = self.seats()[seat]
                engine = self.generation_engine(field, spec)
                if hasattr(engine, "sync"):  # the weight copy, timed on its own
                    _sync(self.device)
                    t = time.perf_counter()
                    engine.sync(self.student, self.global_step)
                    _sync(self.device)
                    record[f"sync_{seat}_s"] = time.perf_counter() - t
                _sync(self.device)
                t = time.perf_counter()
                made[seat] = self.sample(self.student, batch, spec, field)
                _sync(self.device)
                record[f"gen_{seat}_s"] = time.perf_counter() - t
                record[f"tokens_{seat}"] = sum(len(c) for c in made[seat][1])
            used = "hf" if self.global_step % 2 == 0 else "vllm"
            record["trained_on"] = used
            self.records.append(record)
            return pack_sequences(*made[used], self.special_ids()[0])

        @torch.no_grad()
        def greedy_check(self, batch, name: str) -> None:
            """Each engine's greedy completions scored by the student (fp32, teacher forcing)."""
            out = {}
            for seat, (spec, field) in self.seats().items():
                greedy = dataclasses.replace(spec, temperature=0.0)
                engine = self.generation_engine(field, spec)
                t = time.perf_counter()
                prompts, completions = self.sample(self.student, batch, greedy, field)
                if seat == "vllm" and name == "before":
                    _sync(self.device)
                    self.build_s = time.perf_counter() - t  # the engine is built on first use
                packed = pack_sequences(prompts, completions, self.special_ids()[0])
                was = self.student.training
                self.student.eval()
                logits = self.student(
                    input_ids=packed["input_ids"], attention_mask=packed["attention_mask"]
                ).logits.float()
                self.student.train(was)
                mask = packed["labels"][:, 1:] != -100
                hits = logits[:, :-1].argmax(-1) == packed["input_ids"][:, 1:]
                out[f"{seat}_argmax_share"] = round(float(hits[mask].float().mean()), 4)
                out[f"{seat}_tokens"] = int(mask.sum())
                out[f"{seat}_syncs"] = getattr(engine, "syncs", None)
            self.checks[name] = out

    return PairedEngines(**kwargs)


class StepTimer(L.Callback):
    """Each step's wall time (device synced) and the sync checks at both ends of the fit."""

    def __init__(self, check_batch: dict) -> None:
        self.check_batch, self.steps = check_batch, []

    def on_train_start(self, trainer, module) -> None:
        module.greedy_check(self.check_batch, "before")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        _sync(module.device)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        _sync(module.device)
        self.steps.append(time.perf_counter() - self.t0)

    def on_train_end(self, trainer, module) -> None:
        module.greedy_check(self.check_batch, "after")


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--batch", type=int, default=32, help="prompts per step")
    p.add_argument("--prompt", type=int, default=64, help="the longest prompt (tokens)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    p.add_argument("--vllm-kwargs", default="{}", help='JSON, e.g. {"enforce_eager": true}')
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gpu = args.accelerator == "gpu"
    if gpu and not torch.cuda.is_available():
        print(
            "gpu_vllm_onpolicy: no CUDA device here; run it on a GPU machine with "
            'pip install "kd-lightning[vllm]" (a CPU smoke run, hf in both seats: --accelerator cpu)',
            file=sys.stderr,
        )
        raise SystemExit(2)
    if gpu and importlib.util.find_spec("vllm") is None:
        print(
            'gpu_vllm_onpolicy: vllm is not installed; pip install "kd-lightning[vllm]"',
            file=sys.stderr,
        )
        raise SystemExit(2)
    from benchmarks._common import Batches, quiet_trainer, write_result
    from kd_lightning.losses.lm import TokenDivergence
    from kd_lightning.modules.lm_distillation import CausalLMModule, OnPolicySpec
    from kd_lightning.modules.teacher import TeacherSpec

    sizes = SIZES if gpu else TINY
    vocab = args.vocab if gpu else 64
    device = "cuda" if gpu else "cpu"
    on_policy = OnPolicySpec(
        lmbda=1.0,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        vllm_kwargs=json.loads(args.vllm_kwargs) or None,
    )
    with tempfile.TemporaryDirectory() as teacher_dir:
        torch.manual_seed(1)
        CausalLMModule(
            "llama", llama_kwargs(*sizes["teacher"]), num_classes=vocab
        ).model.save_pretrained(teacher_dir)
        torch.manual_seed(0)
        module = paired_module(
            "vllm" if gpu else "hf",
            student="llama",
            student_kwargs=llama_kwargs(*sizes["student"]),
            teacher=TeacherSpec(model=f"hf:{teacher_dir}"),
            heads=[TokenDivergence(1.0, divergence="jsd", beta=0.5)],
            num_classes=vocab,
            chunk_size=0,
            generate_samples=0,
            on_policy=on_policy,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        )
        data = prompt_batches(args.warmup + args.steps, args.batch, args.prompt, vocab, device)
        check = prompt_batches(1, 16, args.prompt, vocab, device, seed=1)[0]
        timer = StepTimer(check)
        trainer = quiet_trainer(
            accelerator=args.accelerator,
            precision="bf16-mixed" if gpu else "32-true",
            max_steps=args.warmup + args.steps,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=Batches(data))
    rows = []
    for record, total in zip(module.records, timer.steps):
        rest = total - record["gen_hf_s"] - record["gen_vllm_s"] - record.get("sync_vllm_s", 0.0)
        hf_step = record["gen_hf_s"] + rest
        vllm_step = record["gen_vllm_s"] + record.get("sync_vllm_s", 0.0) + rest
        rows.append(
            {
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()},
                "rest_s": round(rest, 4),
                "step_ratio_hf_over_vllm": round(hf_step / vllm_step, 3),
                "gen_ratio_hf_over_vllm": round(record["gen_hf_s"] / record["gen_vllm_s"], 3),
            }
        )
    timed = rows[args.warmup :]
    version = None
    if gpu:
        from importlib.metadata import version as _version

        version = _version("vllm")
    write_result(
        {
            "device_name": torch.cuda.get_device_name() if gpu else "cpu",
            "engines": ["hf", "vllm" if gpu else "hf (smoke: hf in both seats)"],
            "vllm_version": version,
            "student": dict(zip(("hidden", "intermediate", "layers", "heads"), sizes["student"])),
            "teacher": dict(zip(("hidden", "intermediate", "layers", "heads"), sizes["teacher"])),
            "vocab": vocab,
            "batch": args.batch,
            "prompt_tokens": f"{args.prompt // 2}-{args.prompt}",
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "precision": "bf16-mixed" if gpu else "32-true",
            "vllm_kwargs": on_policy.vllm_kwargs,
            "warmup": args.warmup,
            "steps": args.steps,
            "median_step_ratio_hf_over_vllm": median([r["step_ratio_hf_over_vllm"] for r in timed]),
            "median_gen_ratio_hf_over_vllm": median([r["gen_ratio_hf_over_vllm"] for r in timed]),
            "median_gen_hf_s": median([r["gen_hf_s"] for r in timed]),
            "median_gen_vllm_s": median([r["gen_vllm_s"] for r in timed]),
            "median_sync_vllm_s": (median([r["sync_vllm_s"] for r in timed]) if gpu else None),
            "median_rest_s": median([r["rest_s"] for r in timed]),
            "vllm_build_s": round(module.build_s, 2),
            "greedy_checks": module.checks,
            "per_step": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
