"""The LM top-k token store (``kd_lightning.modules.lm_token_store``): size, read speed, top-k KL.

For each k, on this machine:

* bytes on disk per stored completion token (ids int32 + values fp16 + log tail mass fp32
  + next token int32, plus the offsets array and the header, all counted);
* write speed: completion tokens/s of ``write_token_store`` (teacher forward + top-k + write);
* read speed: batches/s and tokens/s of reading a random batch of ``--batch`` samples
  (memory-mapped gather through the offsets, checked against the batch's next tokens) and
  rebuilding dense ``[n, V]`` teacher log-probabilities (uniform tail), against the
  teacher's own forward on the same batch (median of ``--repeats`` rounds of ``--reads``);
* the information lost: KL(teacher ‖ stored) per token with the uniform tail, and the mean
  tail mass (what ``drop`` discards and ``bucket`` keeps as one outcome), over the tokens read.

The teacher is the peer benchmark's (``benchmarks/lm_peer.py``) tiny Llama (hidden 128 × 4)
on the bundled movie-review data at the LLM quickstart's sizes; random weights unless
``--teacher-checkpoint`` names a ``CausalLMModule`` checkpoint trained on the same data
(``teacher_trained`` in the JSON says which). A random teacher is nearly uniform, which is
the worst case for the top-k KL.

    python -m benchmarks.lm_token_store --out docs/results/lm_token_store_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import write_result
from benchmarks.lm_peer import TEACHER  # the same tiny Llama teacher
from kd_lightning.machine import machine_info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", nargs="+", type=int, default=[1, 8, 32, 128, 0], help="0: k = V")
    p.add_argument("--samples", type=int, default=512, help="training pairs stored")
    p.add_argument("--batch", type=int, default=16, help="samples per read")
    p.add_argument("--reads", type=int, default=20, help="reads per round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--teacher-checkpoint", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p


def main() -> None:
    from kd_lightning.data.lm import MovieReviewsLMDataModule, PromptCompletionCollator
    from kd_lightning.losses.lm.divergences import forward_kl
    from kd_lightning.models.lm import build_causal_lm
    from kd_lightning.modules.lm_token_store import teacher_logits, write_token_store

    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dm = MovieReviewsLMDataModule(
            data_dir=str(root / "data"),
            vocab_size=args.vocab_size,
            plot_chars=160,
            max_length=args.max_length,
            min_completion=20,
            max_train_examples=args.samples,
            max_eval_examples=16,
            seed=0,
        )
        dm.setup("fit")
        vocab = len(dm.tokenizer)
        if args.teacher_checkpoint:
            from kd_lightning.modules.lm_distillation import build_lm_teacher
            from kd_lightning.modules.teacher import TeacherSpec

            spec = TeacherSpec(checkpoint=args.teacher_checkpoint)
            teacher = build_lm_teacher(spec, vocab, "--teacher-checkpoint")
        else:
            teacher = build_causal_lm("llama", vocab, TEACHER).eval()
        collate = PromptCompletionCollator(dm.tokenizer.pad_token_id)
        train = dm.splits["train"]
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(args.reads):
            index = torch.randperm(len(train), generator=g)[: args.batch]
            batch = collate([train[int(i)] for i in index])
            targets = batch["labels"][:, 1:]
            batches.append((index, batch, targets != -100, targets))

        @torch.inference_mode()
        def live(batch):
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return out.logits[:, :-1, :vocab]

        per_k = []
        for k in args.ks:
            k = k or vocab
            start = time.perf_counter()
            store = write_token_store(
                root / f"k{k}", teacher, dm, k=k, stages=["train"], batch_size=args.batch
            )
            write_s = time.perf_counter() - start
            tokens = store.meta["stages"]["train"]["tokens"]

            def read_all(store=store):
                for index, _, mask, targets in batches:
                    rows = store.batch_rows("train", index, mask, targets)
                    teacher_logits(rows, vocab, "uniform")

            def forward_all():
                for _, batch, mask, _ in batches:
                    live(batch)[mask]

            read_t, fwd_t = [], []
            read_all()  # warm the page cache, as training's second epoch would
            for _ in range(args.repeats):  # interleaved: the machine's drift hits both
                t0 = time.perf_counter()
                read_all()
                read_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                forward_all()
                fwd_t.append(time.perf_counter() - t0)
            n_read = sum(int(m.sum()) for _, _, m, _ in batches)
            kl, tail_mass = [], []
            for index, batch, mask, targets in batches:
                full = live(batch)[mask]
                rows = store.batch_rows("train", index, mask, targets)
                # KL(teacher ‖ stored): the stored distribution plays the student's part
                kl.append(forward_kl(teacher_logits(rows, vocab, "uniform"), full))
                tail_mass.append(rows.tail.exp())
            row: dict[str, Any] = {
                "k": k,
                "bytes_per_token": store.nbytes_per_token(),
                "stored_tokens": tokens,
                "write_tokens_per_s": tokens / write_s,
                "read_batches_per_s": args.reads / statistics.median(read_t),
                "read_tokens_per_s": n_read / statistics.median(read_t),
                "teacher_forward_tokens_per_s": n_read / statistics.median(fwd_t),
                "read_over_forward_speed": statistics.median(fwd_t) / statistics.median(read_t),
                "kl_uniform_tail": torch.cat(kl).mean().item(),
                "mean_tail_mass": torch.cat(tail_mass).mean().item(),
            }
            per_k.append(row)
            print(
                f"k={k}: {row['bytes_per_token']:.1f} B/token, read "
                f"{row['read_tokens_per_s']:,.0f} tokens/s ({row['read_batches_per_s']:.1f} "
                f"batches/s) vs teacher forward {row['teacher_forward_tokens_per_s']:,.0f} "
                f"tokens/s, KL uniform {row['kl_uniform_tail']:.4f}, tail {row['mean_tail_mass']:.3f}",
                flush=True,
            )
    result = {
        "benchmark": "lm_token_store",
        "teacher": args.teacher_checkpoint or {"model": "llama", **TEACHER},
        "teacher_trained": bool(args.teacher_checkpoint),
        "vocab": vocab,
        "value_dtype": "float16",
        "batch": args.batch,
        "max_length": args.max_length,
        "threads": args.threads,
        "per_k": per_k,
        "machine": machine_info(),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
