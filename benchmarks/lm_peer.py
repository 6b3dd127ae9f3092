"""Peer benchmark: TRL's ``GKDTrainer`` against kd-lightning's ``LMDistillationModule``.

Identical work on both sides: the same tiny Llama pair (teacher hidden 128 × 4 layers,
student hidden 64 × 2, built from transformers' ``LlamaConfig``, the same initial weights),
the same batches (the bundled movie-review prompt/completion data of
``kd_lightning.data.lm.MovieReviewsLMDataModule``, tokenized once, padded to 8 × 128
tokens with the loss on the completion tokens), the same loss (generalized JSD, β = 0.5,
temperature 1), AdamW at a constant learning rate, one intra-op thread, the CPU.

* ``off``: off-policy (TRL ``lmbda=0``, ``seq_kd=False``); kd-lightning's
  ``TokenDivergence(divergence="jsd", beta=0.5)``, on the full logits (``kd``) and with the
  chunked loss (``kd_chunked``, ``chunk_size=256``: never holds either model's full logits).
* ``on``: on-policy (TRL ``lmbda=1``; kd-lightning ``on_policy: OnPolicySpec(lmbda=1)``):
  the student samples ``--max-new-tokens`` completion tokens per prompt (temperature 1,
  no top-k/top-p, KV cache) and is trained on them; the generation's CPU time is reported
  for both (``generate_cpu_s``: time inside the student's ``generate``).

Each run is its own process (``--worker``), and the runs are interleaved in rounds (the
order alternates between rounds), so the machine's drift hits both sides alike. Per run:
the median process-CPU seconds per optimizer step after ``--warmup`` steps (time between
consecutive step starts: data, forward, loss, backward, optimizer, hooks), and the peak
RSS growth: the highest resident set size sampled every 2 ms from just before the trainer
is built to the end of training, minus the resident set size at that moment (both models
and the tokenized data are already in memory). The ratios are kd-lightning / TRL of the
medians over rounds.

    pip install -e ".[bench-llm]" -c constraints.txt
    python -m benchmarks.lm_peer --out docs/results/lm_peer_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TEACHER = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
STUDENT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
# the data's tokenizer: <|endoftext|> = 0 (EOS), <|pad|> = 1; generation stops at the same id
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
TEACHER, STUDENT = {**TEACHER, **SPECIAL}, {**STUDENT, **SPECIAL}
LR = 1e-4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128, help="tokens per row (padded)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="on-policy generation length")
    p.add_argument(
        "--sides",
        nargs="+",
        default=["trl", "kd", "kd_chunked"],
        choices=["trl", "kd", "kd_chunked", "hand"],
    )
    p.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # side:mode:workdir
    return p


# -- shared set-up (both sides) ------------------------------------------------------------------
def data_module(workdir: Path, args: argparse.Namespace):
    from kd_lightning.data.lm import MovieReviewsLMDataModule

    # plots long enough that most rows fill the 128 tokens; 24 completion tokens at least
    dm = MovieReviewsLMDataModule(
        data_dir=str(workdir / "data"),
        vocab_size=1024,
        plot_chars=600,
        max_length=args.length,
        min_completion=24,
        batch_size=args.batch,
        max_train_examples=args.batch * (args.steps + args.warmup + 1),
        seed=0,
    )
    dm.setup("fit")
    return dm


class FixedWidthCollator:
    """kd-lightning's ``PromptCompletionCollator``, right-padded to ``width`` tokens, plus the
    left-padded prompts that on-policy generation starts from (TRL's collator keys)."""

    def __init__(self, pad_id: int, width: int) -> None:
        from kd_lightning.data.lm import PromptCompletionCollator

        self.base, self.pad_id, self.width = PromptCompletionCollator(pad_id), pad_id, width

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        out = self.base(rows)
        extra = self.width - out["input_ids"].shape[1]
        out["input_ids"] = F.pad(out["input_ids"], (0, extra), value=self.pad_id)
        out["attention_mask"] = F.pad(out["attention_mask"], (0, extra), value=0)
        out["labels"] = F.pad(out["labels"], (0, extra), value=-100)
        p = max(r["prompt_len"] for r in rows)
        prompts = torch.full((len(rows), p), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(rows), p), dtype=torch.long)
        for i, r in enumerate(rows):
            n = r["prompt_len"]
            prompts[i, p - n :] = torch.tensor(r["input_ids"][:n])
            prompt_mask[i, p - n :] = 1
        out["prompts"], out["prompt_attention_mask"] = prompts, prompt_mask
        return out


def build_weights(workdir: Path, vocab: int) -> None:
    """The pair's initial weights, written once and loaded by every run."""
    import torch

    from kd_lightning.models.lm import build_causal_lm

    for name, kwargs, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        torch.manual_seed(seed)
        model = build_causal_lm("llama", vocab, kwargs)
        torch.save(model.state_dict(), workdir / f"{name}.pt")


class RSSPeak:
    """The highest resident set size seen by a 2 ms sampler thread, from ``start``."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def start(self) -> RSSPeak:
        self.base = self.peak = self.now()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak - self.base


class StepClock:
    """Process-CPU and wall timestamps at each step start, and the generation time."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.gen_cpu: list[float] = []  # per step: CPU seconds spent in generate()

    def tick(self) -> None:
        self.cpu.append(time.process_time())
        self.wall.append(time.perf_counter())
        self.gen_cpu.append(0.0)

    def per_step(self, skip: int) -> dict[str, float]:
        def med(ts: list[float]) -> float:
            return statistics.median(b - a for a, b in zip(ts[skip:], ts[skip + 1 :]))

        gen = self.gen_cpu[skip + 1 :]
        return {
            "cpu_s": med(self.cpu),
            "wall_s": med(self.wall),
            "generate_cpu_s": statistics.median(gen) if gen else 0.0,
        }


def timed_generate(clock: StepClock, generate):
    """Wraps a model's ``generate`` so its CPU time is charged to the current step."""

    def wrapper(*a, **k):
        start = time.process_time()
        try:
            return generate(*a, **k)
        finally:
            if clock.gen_cpu:
                clock.gen_cpu[-1] += time.process_time() - start

    return wrapper


# -- the two sides ---------------------------------------------------------------------------------
def run_trl(workdir: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kd_lightning.models.lm import build_causal_lm

    dm = data_module(workdir, args)
    vocab = len(dm.tokenizer)
    teacher = build_causal_lm("llama", vocab, TEACHER)
    teacher.load_state_dict(torch.load(workdir / "teacher.pt"))
    student = build_causal_lm("llama", vocab, STUDENT)
    student.load_state_dict(torch.load(workdir / "student.pt"))
    clock = StepClock()
    student.generate = timed_generate(clock, student.generate)

    class Tick(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.tick()

        def on_train_end(self, *a, **k):
            clock.tick()

    rss = RSSPeak().start()
    config = GKDConfig(
        output_dir=str(workdir / "trl-out"),
        use_cpu=True,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        warmup_steps=0,
        optim="adamw_torch",
        lmbda=1.0 if mode == "on" else 0.0,
        beta=0.5,
        temperature=1.0,
        seq_kd=False,
        max_new_tokens=args.max_new_tokens,
        max_length=args.length,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        seed=0,
        data_seed=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dm.splits["train"],
        processing_class=dm.tokenizer,
        data_collator=FixedWidthCollator(dm.tokenizer.pad_token_id, args.length),
        callbacks=[Tick()],
    )
    trainer.train()
    growth = rss.stop()
    return {
        **clock.per_step(args.warmup),
        "peak_rss_growth_mib": growth / 2**20,
        "steps": len(clock.cpu) - 1,
    }


def run_kd(workdir: Path, mode: str, args: argparse.Namespace, chunk: int) -> dict[str, Any]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from benchmarks._common import quiet_trainer
    from kd_lightning.losses.lm import TokenDivergence
    from kd_lightning.modules.lm_distillation import LMDistillationModule
    from kd_lightning.modules.teacher import TeacherSpec

    dm = data_module(workdir, args)
    vocab = len(dm.tokenizer)
    clock = StepClock()

    class Tick(L.Callback):
        def on_train_batch_start(self, *a, **k):
            clock.tick()

        def on_train_end(self, *a, **k):
            clock.tick()

    extra: dict[str, Any] = {}
    if mode == "on":  # TRL's sampling: temperature 1, top_k 0, top_p 1, KV cache
        from kd_lightning.modules.lm_distillation import OnPolicySpec

        spec = OnPolicySpec(lmbda=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens)
        extra = {"on_policy": spec}
    loader = DataLoader(
        dm.splits["train"],
        batch_size=args.batch,
        shuffle=True,
        num_workers=0,
        collate_fn=FixedWidthCollator(dm.tokenizer.pad_token_id, args.length),
        generator=torch.Generator().manual_seed(0),
    )
    module = LMDistillationModule(
        student="llama",
        student_kwargs=STUDENT,
        teacher=TeacherSpec(
            model="llama", model_kwargs=TEACHER, weights=str(workdir / "teacher.pt")
        ),
        heads=[TokenDivergence(divergence="jsd", beta=0.5)],
        chunk_size=chunk,
        num_classes=vocab,
        vocab_sizes={"input_ids": vocab},
        generate_samples=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0),
        **extra,
    )
    module.student.load_state_dict(torch.load(workdir / "student.pt"))
    module.student.generate = timed_generate(clock, module.student.generate)
    rss = RSSPeak().start()  # both models built, as on the TRL side
    trainer = quiet_trainer(max_steps=args.warmup + args.steps, callbacks=[Tick()])
    trainer.fit(module, train_dataloaders=loader)
    growth = rss.stop()
    return {
        **clock.per_step(args.warmup),
        "peak_rss_growth_mib": growth / 2**20,
        "steps": len(clock.cpu) - 1,
    }


def run_hand(workdir: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """A yardstick, not a peer: the same off-policy step written by hand in plain PyTorch
    (teacher forward without grad, student forward, the same JSD, backward, AdamW), the floor
    that any trainer's time and memory sit on."""
    import torch
    from torch.utils.data import DataLoader

    from kd_lightning.losses.lm.divergences import generalized_jsd
    from kd_lightning.models.lm import build_causal_lm

    if mode != "off":
        raise SystemExit("the hand-written yardstick is off-policy only")
    dm = data_module(workdir, args)
    vocab = len(dm.tokenizer)
    teacher = build_causal_lm("llama", vocab, TEACHER).eval()
    teacher.load_state_dict(torch.load(workdir / "teacher.pt"))
    student = build_causal_lm("llama", vocab, STUDENT)
    student.load_state_dict(torch.load(workdir / "student.pt"))
    loader = DataLoader(
        dm.splits["train"],
        batch_size=args.batch,
        shuffle=True,
        collate_fn=FixedWidthCollator(dm.tokenizer.pad_token_id, args.length),
        generator=torch.Generator().manual_seed(0),
    )
    clock = StepClock()
    rss = RSSPeak().start()
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    for step, batch in enumerate(loader):
        if step == args.warmup + args.steps:
            break
        clock.tick()
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["labels"][:, 1:] != -100
        loss = generalized_jsd(s.logits[:, :-1][mask], t.logits[:, :-1][mask], 0.5).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    clock.tick()
    growth = rss.stop()
    return {
        **clock.per_step(args.warmup),
        "peak_rss_growth_mib": growth / 2**20,
        "steps": len(clock.cpu) - 1,
    }


def has_on_policy() -> bool:
    import inspect

    from kd_lightning.modules.lm_distillation import LMDistillationModule

    return "on_policy" in inspect.signature(LMDistillationModule.__init__).parameters


def worker(spec: str, args: argparse.Namespace) -> None:
    import torch

    side, mode, workdir = spec.split(":", 2)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # import both frameworks before any baseline, so import-time memory counts for neither
    import lightning  # noqa: F401
    import trl.experimental.gkd  # noqa: F401

    if side == "trl":
        out = run_trl(Path(workdir), mode, args)
    elif side == "hand":
        out = run_hand(Path(workdir), mode, args)
    else:
        out = run_kd(Path(workdir), mode, args, chunk=256 if side == "kd_chunked" else 0)
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


# -- the driver --------------------------------------------------------------------------------------
def main() -> None:
    args = parser().parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    from benchmarks._common import write_result
    from kd_lightning.machine import machine_info

    modes = [m for m in args.modes if m == "off" or has_on_policy()]
    skipped = [m for m in args.modes if m not in modes]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dm = data_module(workdir, args)  # trains and caches the BPE and the tokenized rows once
        build_weights(workdir, len(dm.tokenizer))
        lengths = [len(r["input_ids"]) for r in dm.splits["train"]]
        completion = [len(r["input_ids"]) - r["prompt_len"] for r in dm.splits["train"]]
        runs: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in args.sides} for m in modes}
        for r in range(args.rounds):
            for mode in modes:
                order = args.sides if r % 2 == 0 else list(reversed(args.sides))
                for side in order:
                    cmd = [
                        sys.executable,
                        "-m",
                        "benchmarks.lm_peer",
                        "--worker",
                        f"{side}:{mode}:{workdir}",
                        *_forward(args),
                    ]
                    proc = subprocess.run(
                        cmd,
                        capture_output=True,
                        text=True,
                        cwd=Path(__file__).resolve().parent.parent,
                    )
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                        raise SystemExit(f"run {side}/{mode} failed (rc {proc.returncode})")
                    res = json.loads(lines[-1][len("RESULT ") :])
                    runs[mode][side].append(res)
                    print(
                        f"round {r} {mode}-policy {side}: {res['cpu_s'] * 1e3:.1f} ms CPU/step, "
                        f"generate {res['generate_cpu_s'] * 1e3:.1f} ms, "
                        f"RSS growth {res['peak_rss_growth_mib']:.1f} MiB",
                        flush=True,
                    )
    summary: dict[str, Any] = {}
    for mode, sides in runs.items():
        med = {
            s: {
                k: statistics.median(x[k] for x in rs)
                for k in ("cpu_s", "wall_s", "generate_cpu_s", "peak_rss_growth_mib")
            }
            for s, rs in sides.items()
        }
        row: dict[str, Any] = {"median": med}
        if "trl" in med:
            for s in med:
                if s == "trl":
                    continue
                row[f"{s}_over_trl"] = {
                    "cpu_per_step": med[s]["cpu_s"] / med["trl"]["cpu_s"],
                    "peak_rss_growth": med[s]["peak_rss_growth_mib"]
                    / max(med["trl"]["peak_rss_growth_mib"], 1e-9),
                }
                print(
                    f"{mode}-policy {s} / trl: CPU per step "
                    f"{row[f'{s}_over_trl']['cpu_per_step']:.3f}, peak RSS growth "
                    f"{row[f'{s}_over_trl']['peak_rss_growth']:.3f}",
                    flush=True,
                )
        summary[mode] = {**row, "runs": sides}
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    result = {
        "benchmark": "lm_peer",
        "goal": {
            "off": "kd/trl <= 0.5 CPU per step, <= 0.3 peak RSS growth",
            "on": "kd/trl <= 0.6 CPU per step",
        },
        "settings": {
            "teacher": TEACHER,
            "student": STUDENT,
            "batch": args.batch,
            "length": args.length,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "threads": args.threads,
            "beta": 0.5,
            "lr": LR,
            "max_new_tokens": args.max_new_tokens,
            "mean_row_tokens": statistics.mean(lengths),
            "mean_completion_tokens": statistics.mean(completion),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl_version,
        },
        "skipped_modes": {
            m: "LMDistillationModule has no on-policy mode (on_policy) yet" for m in skipped
        },
        "results": summary,
        "machine": machine_info(),
    }
    write_result(result, args.out)


def _forward(args: argparse.Namespace) -> list[str]:
    return [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--threads",
        str(args.threads),
    ]


if __name__ == "__main__":
    main()
