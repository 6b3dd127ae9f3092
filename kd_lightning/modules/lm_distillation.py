"""Causal-LM training and distillation on prompt/completion data, in the same core.

``CausalLMModule`` trains one decoder on the completion tokens (teacher pre-training, or
the student trained on the completions alone); ``LMDistillationModule`` distils a frozen
teacher decoder into a student with per-token heads (``kd_lightning.losses.lm``). Both
share ``BaseModule``'s optimizer wiring and logging; the distiller shares the frozen-
teacher machinery (unregistered teachers, fingerprints, resume refusal) with the image and
text ``DistillationModule`` through ``FrozenTeacherModule``, and ``init_from_teacher``'s
``every_kth`` maps a shallower student's decoder layers to every k-th teacher layer.

Token accounting. Each head returns a sum over completion tokens. The loss of one optimizer
step is Σ(loss over the window's completion tokens) / (completion tokens in the whole
accumulation window, over every DDP rank). The window's count is known only at its end, so
each micro-batch back-propagates its own sum and ``on_before_optimizer_step`` rescales the
accumulated gradients once by ``accumulate · world / N_window`` (undoing Lightning's
``1/accumulate`` and DDP's ``1/world`` averaging): grad(Σ/N) = grad(Σ)/N exactly, however
the window is split into micro-batches and ranks.

On-policy and mixed training (GKD, Agarwal et al. 2024). With ``on_policy.lmbda`` = λ, each
training batch is, with probability λ (a seeded draw per (epoch, batch), the same on every
rank), replaced by the student's own completions of its prompts: the prompts are left-padded
for ``generate`` (KV cache on) in chunks of ``generation_batch_size``, each completion is cut
after its first EOS (so ``pad == eos`` is safe), and the sequences are re-packed right-padded
(prompt + generated completion) exactly like a dataset batch, so the teacher reads the same
sequences and the token count of the step is the generated completion tokens.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import SumMetric

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm import TokenCrossEntropy, TokenDivergence, TokenHead
from kd_lightning.losses.lm.divergences import forward_kl, generalized_jsd, reverse_kl
from kd_lightning.losses.outputs import TokenOutput
from kd_lightning.models.lm import LoRASpec, apply_lora, backbone, build_causal_lm
from kd_lightning.models.lm_generate import Engine, check_engine, make_engine
from kd_lightning.modules.base import BaseModule
from kd_lightning.modules.frozen_teacher import FrozenTeacherModule
from kd_lightning.modules.init_from_teacher import InitReport, InitStrategy, copy_from_teacher
from kd_lightning.modules.sharding import is_sharded, reshard_frozen
from kd_lightning.modules.teacher import TeacherSpec, freeze, mark_untrained

#: per-token means at eval (teacher_nll and the divergences need a teacher of the same tokenizer)
PER_TOKEN = ("nll", "teacher_nll", "kl", "reverse_kl", "jsd")
EVAL_SUMS = ("tokens", "bytes", *PER_TOKEN)


@dataclass
class OnPolicySpec:
    """Student-generated completions (GKD's λ; ``model.on_policy``).

    Args:
        lmbda: probability per training batch that the student generates its completions
            (0: off-policy, the dataset's completions; 1: always on-policy).
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling mass (1: off).
        max_new_tokens: the longest generated completion.
        generation_batch_size: prompts per ``generate`` call (0: the whole micro-batch), so
            the KV cache's memory does not grow with the micro-batch.
        seed: of the per-batch λ draw.
        schedule: ``gkd`` (a fixed λ) or ``adaptive``: DistiLLM's adaptive off-policy
            schedule (Ko et al. 2024; λ unused): a threshold p starts at ``init_threshold``
            and rises by 0.1 (at most 1) whenever the validation NLL rose by ``loss_eps``
            or more; per batch, with u ~ U(0, 1): u < p·ρ(step), or u < p while the replay
            buffer holds fewer than ``capacity`` rows: the student generates (and the rows
            enter the buffer); else u < p: a batch is drawn from the buffer; else the
            dataset's batch. ρ = ``replay_ratio``: ``decreasing`` 1 − step/total,
            ``constant`` 0.5, ``increasing`` step/total. jongwooko/distillm@d47e77f
            finetune.py L291-L323 and L412-L417; defaults arguments.py L186-L192. The
            buffer is not checkpointed (p and the last loss are).
        engine: ``hf`` (``generate``, the default) or ``vllm`` (vLLM in this process, the
            student's weights copied in after each optimizer step; ``pip install
            "kd-lightning[vllm]"``, a CUDA GPU; ``models/lm_generate.py``).
        vllm_kwargs: extra ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``dtype``...).
    """

    lmbda: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    generation_batch_size: int = 0
    seed: int = 0
    schedule: Literal["gkd", "adaptive"] = "gkd"
    init_threshold: float = 0.0
    loss_eps: float = 0.1
    capacity: int = 1000
    replay_ratio: Literal["decreasing", "constant", "increasing"] = "decreasing"
    engine: Engine = "hf"
    vllm_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        check_engine(self.engine, "model.on_policy.engine")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError("model.on_policy.lmbda", self.lmbda, "use a probability in [0, 1]")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                "model.on_policy", self, "use temperature >= 0 (0: greedy) and 0 < top_p <= 1"
            )
        if self.schedule == "adaptive" and (
            not 0 <= self.init_threshold <= 1 or self.capacity < 1 or self.loss_eps < 0
        ):
            raise ConfigError(
                "model.on_policy",
                self,
                "use 0 <= init_threshold <= 1, capacity >= 1, loss_eps >= 0",
            )
        if self.max_new_tokens < 1 or self.generation_batch_size < 0:
            raise ConfigError(
                "model.on_policy", self, "use max_new_tokens >= 1, generation_batch_size >= 0"
            )

    def uniform(self, epoch: int, batch_idx: int) -> float:
        """u ~ U(0, 1), deterministic in (seed, epoch, batch): a rerun (and every DDP rank)
        makes the same choices."""
        digest = hashlib.sha256(f"{self.seed}:{epoch}:{batch_idx}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return float(torch.rand((), generator=g, dtype=torch.float64))

    def draw(self, epoch: int, batch_idx: int) -> bool:
        """Whether this batch is generated (GKD's λ)."""
        if self.lmbda <= 0 or self.lmbda >= 1:
            return self.lmbda >= 1
        return self.uniform(epoch, batch_idx) < self.lmbda


def adaptive_action(
    u: float, threshold: float, step: int, total: int, buffered: int, capacity: int, ratio: str
) -> Literal["generate", "replay", "dataset"]:
    """DistiLLM's per-batch choice (finetune.py L291-L323)."""
    frac = step / max(total, 1)
    samp = threshold * {"constant": 0.5, "increasing": frac, "decreasing": 1 - frac}[ratio]
    if u < samp or (u < threshold and buffered < capacity):
        return "generate"
    return "replay" if u < threshold else "dataset"


def adaptive_threshold_update(
    threshold: float, previous: float | None, current: float, eps: float
) -> tuple[float, float]:
    """DistiLLM's threshold step after an evaluation (finetune.py L412-L417): up by 0.1
    (at most 1) when the loss rose by ``eps`` or more; the reference loss moves only then.
    The first evaluation sets the reference (theirs evaluates once before training)."""
    if previous is None:
        return threshold, current
    if current >= previous + eps:
        return min(threshold + 0.1, 1.0), current
    return threshold, previous


@dataclass
class SequenceKDSpec:
    """Sequence-level KD (Kim & Rush 2016; ``model.sequence_kd``): the teacher completes
    every training prompt once, the completions are stored at ``path`` and the student is
    trained on them in place of the dataset's, reused by every later run whose key (teacher
    fingerprint, tokenizer, training prompts, temperature, top_p, max_new_tokens, seed)
    matches; a stored file with another key is refused unless ``regenerate``.

    Args:
        path: the ``.pt`` file of the teacher's completions.
        temperature, top_p, max_new_tokens: the teacher's sampling (temperature 0: greedy).
        seed: of the sampling RNG (the run's own RNG is left as it was).
        generation_batch_size: prompts per ``generate`` call.
        regenerate: replace a stored file whose key differs.
        engine, vllm_kwargs: the teacher's generation engine, as ``OnPolicySpec``'s (part of
            the key when not ``hf``).
    """

    path: str = "data/llm/sequence_kd/teacher_generations.pt"
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    generation_batch_size: int = 32
    regenerate: bool = False
    engine: Engine = "hf"
    vllm_kwargs: dict[str, Any] | None = None


def sequence_kd_key(fingerprints: Any, tokenizer: str | None, spec: SequenceKDSpec, train) -> str:
    """What the stored teacher generations depend on."""
    prompts = hashlib.sha256()
    for row in train:
        prompts.update(json.dumps(row["input_ids"][: row["prompt_len"]]).encode())
    settings = [spec.temperature, spec.top_p, spec.max_new_tokens, spec.seed]
    if spec.engine != "hf":  # hf keys stay as they were before engines existed
        settings.append(spec.engine)
    payload = json.dumps([fingerprints, tokenizer, prompts.hexdigest(), settings], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prompt_lengths(batch: dict[str, Tensor]) -> Tensor:
    """Tokens before each row's first completion token (all of it when it has none)."""
    has = batch["labels"] != -100
    return torch.where(has.any(1), has.int().argmax(1), batch["attention_mask"].sum(1))


def left_padded_prompts(batch: dict[str, Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """The rows' prompts, left-padded (what a decoder's ``generate`` needs)."""
    lens = prompt_lengths(batch)
    width = int(lens.max())
    ids = torch.full((len(lens), width), pad_id, dtype=torch.long, device=lens.device)
    attention = torch.zeros_like(ids)
    for i, n in enumerate(lens.tolist()):
        ids[i, width - n :] = batch["input_ids"][i, :n]
        attention[i, width - n :] = 1
    return ids, attention


def completion_mask(generated: Tensor, eos_id: int | None) -> Tensor:
    """True up to and including each row's first EOS; False after it (``generate``'s
    padding). Counting EOS tokens instead of comparing with the pad id keeps it right when
    ``pad == eos``."""
    if eos_id is None:
        return torch.ones_like(generated, dtype=torch.bool)
    is_eos = (generated == eos_id).int()
    return (is_eos.cumsum(1) - is_eos) == 0


def pack_sequences(
    prompts: list[Tensor], completions: list[Tensor], pad_id: int
) -> dict[str, Tensor]:
    """Right-padded prompt + completion rows, labels on the completion only (as the
    dataset's collator builds them)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    device = prompts[0].device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.cat([p, c])
        attention[i, :n] = 1
        labels[i, len(p) : n] = c
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class _CausalLMCore:
    """Forward passes, token accounting and evaluation shared by both LM modules."""

    chunk_size: int = 0
    real_vocab: int = 0
    _window_tokens: Tensor | None = None

    # -- forward ---------------------------------------------------------------------------
    def lm_output(
        self, model: nn.Module, batch: dict[str, Tensor], hidden: bool, vocab: int = 0
    ) -> TokenOutput:
        """The model's shifted outputs: logits (or, chunked, none), mask and targets; logits
        and head rows cut to ``vocab`` (default the data's tokenizer's)."""
        vocab = vocab or self.real_vocab
        chunked = self.chunk_size > 0
        ids, attention = batch["input_ids"], batch["attention_mask"]
        if chunked:
            out = backbone(model)(
                input_ids=ids, attention_mask=attention, output_hidden_states=hidden
            )
            states = out.hidden_states if hidden else (out.last_hidden_state,)
            states = (*states[:-1], out.last_hidden_state)
            logits = None
        else:
            out = model(input_ids=ids, attention_mask=attention, output_hidden_states=hidden)
            states, logits = (
                (out.hidden_states if hidden else ()),
                out.logits[:, :-1, :vocab],
            )
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        return TokenOutput(
            logits=logits,
            mask=mask,
            targets=targets.clamp_min(0),
            hidden_states=tuple(s[:, :-1] for s in states),
            head_weight=model.get_output_embeddings().weight[:vocab],
        )

    # -- token accounting ---------------------------------------------------------------------
    def count_tokens(self, mask: Tensor) -> None:
        n = mask.sum()
        self._window_tokens = n if self._window_tokens is None else self._window_tokens + n

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        tokens, self._window_tokens = self._window_tokens, None
        if tokens is None:
            return
        trainer = self.trainer
        if trainer.world_size > 1:
            tokens = trainer.strategy.reduce(tokens.float(), reduce_op="sum")
        scale = trainer.accumulate_grad_batches * trainer.world_size / tokens.float().clamp_min(1)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))

    # -- evaluation ---------------------------------------------------------------------------
    def _eval_sums(self) -> nn.ModuleDict:
        return nn.ModuleDict({k: SumMetric() for k in EVAL_SUMS})

    _byte_table: Tensor | None = None

    def token_byte_lengths(self) -> Tensor | None:
        """How many UTF-8 bytes each token of the data's tokenizer stands for (0 for special
        tokens), for bits per byte; None when the data has no byte-level BPE tokenizer."""
        if self._byte_table is None:
            from kd_lightning.losses.lm.align import token_bytes

            tokenizer = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
            lengths: list[int] = []
            if tokenizer is not None:
                with contextlib.suppress(ConfigError):  # not byte-level (e.g. SentencePiece)
                    lengths = [len(b) for b in token_bytes(tokenizer, range(len(tokenizer)))]
            self._byte_table = torch.tensor(lengths, dtype=torch.float32)
        return self._byte_table if self._byte_table.numel() else None

    def update_eval(
        self, sums: nn.ModuleDict, student: TokenOutput, teacher: TokenOutput | None
    ) -> None:
        mask = student.mask
        s = self._logits(student)[mask]
        sums["tokens"].update(mask.sum().float())
        lengths = self.token_byte_lengths()
        if lengths is not None:
            sums["bytes"].update(lengths.to(mask.device)[student.targets[mask]].sum())
        sums["nll"].update(F.cross_entropy(s.float(), student.targets[mask], reduction="sum"))
        if teacher is not None:
            t = self._logits(teacher)[mask]
            sums["teacher_nll"].update(
                F.cross_entropy(t.float(), student.targets[mask], reduction="sum")
            )
            sums["kl"].update(forward_kl(s, t).sum())
            sums["reverse_kl"].update(reverse_kl(s, t).sum())
            sums["jsd"].update(generalized_jsd(s, t, 0.5).sum())

    def _logits(self, out: TokenOutput) -> Tensor:
        if out.logits is not None:
            return out.logits
        return out.hidden_states[-1] @ out.head_weight.t()

    def log_eval_sums(self, stage: str, sums: nn.ModuleDict, with_teacher: bool) -> None:
        n = sums["tokens"].compute().clamp_min(1)
        keys = PER_TOKEN if with_teacher else ("nll",)
        values = {f"{stage}/{k}": sums[k].compute() / n for k in keys}
        values[f"{stage}/ppl"] = values[f"{stage}/nll"].exp()
        if with_teacher:
            values[f"{stage}/teacher_ppl"] = values[f"{stage}/teacher_nll"].exp()
        # bits per UTF-8 byte of the completions: comparable across tokenizers (the EOS token's
        # NLL counts, its bytes are 0); the teacher's on the same bytes
        nbytes = sums["bytes"].compute() if sums["bytes"].update_called else 0
        if nbytes > 0:
            for k in ("nll", "teacher_nll") if with_teacher else ("nll",):
                name = k.replace("nll", "bpb")
                values[f"{stage}/{name}"] = sums[k].compute() / nbytes / math.log(2)
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)
        for metric in sums.values():
            metric.reset()

    # -- the eval steps (one copy for both modules) ----------------------------------------------
    def trained_model(self) -> nn.Module:
        """The network this module trains (``model``, or the distiller's ``student``)."""
        raise NotImplementedError

    def eval_teacher_output(self, batch: dict[str, Tensor]) -> TokenOutput | None:
        """The teacher's outputs on an eval batch (None: no teacher, student metrics only)."""
        return None

    def _eval(self, batch: dict[str, Tensor], sums: nn.ModuleDict) -> None:
        student = self.lm_output(self.trained_model(), batch, hidden=False)
        self.update_eval(sums, student, self.eval_teacher_output(batch))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval(batch, self.val_sums)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval(batch, self.test_sums)

    def on_validation_epoch_end(self) -> None:
        self.log_eval_sums("val", self.val_sums, with_teacher=self.teacher_model() is not None)

    def on_test_epoch_end(self) -> None:
        teacher = self.teacher_model()
        self.log_eval_sums("test", self.test_sums, with_teacher=teacher is not None)
        self.generation_metrics("test", teacher)

    def teacher_model(self) -> nn.Module | None:
        return None

    # -- generation (ROUGE-L, length, distinct-n, exposure bias) ----------------------------------
    generate_samples: int = 0
    max_new_tokens: int = 48

    def generation_metrics(self, stage: str, teacher: nn.Module | None) -> None:
        """Greedy completions of the first ``generate_samples`` held-out prompts by the
        trained model (and by the teacher, when there is one), logged as ``<stage>/rougeL``
        (ROUGE-L F against the reference completions, the ``rouge-score`` package),
        ``gen_len``, ``distinct_1``, ``distinct_2`` (``teacher_`` for the teacher's), and with
        a teacher ``exposure_bias``: ExAccErr (%) with the teacher as the oracle, on the
        student's and the teacher's completions (``modules/lm_eval_stats.py``)."""
        student = self.greedy_completions(self.trained_model(), stage)
        if not student:
            return
        self.log_completion_stats(stage, "", student)
        if teacher is None:
            return
        oracle = self.greedy_completions(teacher, stage)
        self.log_completion_stats(stage, "teacher_", oracle)
        from kd_lightning.modules.lm_eval_stats import exposure_bias

        stats = exposure_bias(
            self.prefix_kl(teacher, student), self.prefix_kl(teacher, oracle), self.max_new_tokens
        )
        if stats is not None:
            self.log(f"{stage}/exposure_bias", stats["exposure_bias"], sync_dist=True)

    def greedy_completions(self, model: nn.Module, stage: str) -> list[dict[str, Any]]:
        """``[{prompt, completion (token ids before EOS), text, reference}]`` of the first
        ``generate_samples`` prompts of ``stage``, greedy, at most ``max_new_tokens``."""
        dm = getattr(self._trainer, "datamodule", None)
        if not self.generate_samples or dm is None or not hasattr(dm, "generation_pairs"):
            return []
        tokenizer = dm.tokenizer
        eos = tokenizer.eos_token_id
        out: list[dict[str, Any]] = []
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for prompt_ids, reference in dm.generation_pairs(stage, self.generate_samples):
                ids = torch.tensor([prompt_ids], device=self.device)
                generated = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos,
                )[0, ids.shape[1] :].tolist()
                if eos is not None and eos in generated:
                    generated = generated[: generated.index(eos)]
                text = tokenizer.decode(generated, skip_special_tokens=True)
                out.append(
                    {
                        "prompt": list(prompt_ids),
                        "completion": generated,
                        "text": text,
                        "reference": reference,
                    }
                )
        nn.Module.train(model, was_training)
        return out

    def log_completion_stats(self, stage: str, prefix: str, gens: list[dict[str, Any]]) -> None:
        from kd_lightning.modules.lm_eval_stats import distinct_n, mean_length, words

        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ConfigError(
                "model.generate_samples",
                self.generate_samples,
                'ROUGE-L needs rouge-score: pip install "kd-lightning[llm]", or set 0',
            ) from None
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [scorer.score(g["reference"], g["text"])["rougeL"].fmeasure for g in gens]
        texts = words([g["text"] for g in gens])
        values = {
            "rougeL": sum(scores) / len(scores),
            "gen_len": mean_length([g["completion"] for g in gens]),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
        }
        for key, value in values.items():
            if value is not None:
                self.log(f"{stage}/{prefix}{key}", float(value), sync_dist=True)

    def prefix_kl(self, teacher: nn.Module, gens: list[dict[str, Any]]) -> list[Tensor]:
        """Per completion, KL(teacher ‖ trained model) of the next-token distributions at
        each completion step, on the prefix prompt + the completion's earlier tokens."""
        from kd_lightning.modules.lm_eval_stats import step_kl

        model, out = self.trained_model(), []
        was = model.training, teacher.training
        model.eval()
        teacher.eval()
        with torch.inference_mode():
            for g in gens:
                n, m = len(g["prompt"]), len(g["completion"])
                if m == 0:
                    out.append(torch.zeros(0))
                    continue
                ids = torch.tensor([g["prompt"] + g["completion"]], device=self.device)
                rows = slice(n - 1, n + m - 1)  # the logits that predict the completion
                t = teacher(input_ids=ids).logits[0, rows, : self.real_vocab]
                s = model(input_ids=ids).logits[0, rows, : self.real_vocab]
                out.append(step_kl(t, s).cpu())
        nn.Module.train(model, was[0])
        nn.Module.train(teacher, was[1])
        return out


def _check_vocab(num_classes: int, vocab_sizes: dict[str, int] | None) -> int:
    vocab = int((vocab_sizes or {}).get("input_ids", num_classes))
    if vocab < 2:
        raise ConfigError("data.vocab_size", vocab, "the tokenizer needs at least 2 tokens")
    return vocab


class CausalLMModule(_CausalLMCore, BaseModule):
    """One causal LM trained on the completion tokens (cross-entropy, token-accounted).

    Args:
        model: ``llama``/``gpt2`` (built-in tiny decoders) or ``hf:<folder>``.
        model_kwargs: the built-in decoder's config fields, or ``from_pretrained`` kwargs.
        num_classes, input_shape, vocab_sizes: linked from the DataModule (the tokenizer's
            real vocabulary; logits beyond it, a padded embedding table's, are cut).
        chunk_size: > 0 computes the loss ``chunk_size`` tokens at a time from the final
            hidden states, never holding the full ``[N, V]`` logits.
        generate_samples, max_new_tokens: greedy completions scored with ROUGE-L at test.
        optimizer, lr_scheduler: see ``BaseModule``.
    """

    monitor = "val/nll"

    def __init__(
        self,
        model: str = "llama",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 0,
        input_shape: tuple[int, ...] = (64,),
        vocab_sizes: dict[str, int] | None = None,
        chunk_size: int = 0,
        generate_samples: int = 16,
        max_new_tokens: int = 48,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.real_vocab = _check_vocab(num_classes, vocab_sizes)
        self.chunk_size, self.generate_samples = int(chunk_size), int(generate_samples)
        self.max_new_tokens = int(max_new_tokens)
        self.model = build_causal_lm(model, self.real_vocab, model_kwargs, "model.model")
        self.ce = TokenCrossEntropy()
        self.val_sums, self.test_sums = self._eval_sums(), self._eval_sums()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.lm_output(self.model, batch, hidden=False)
        total = self.ce(out, None, batch)
        self.count_tokens(out.mask)
        n = out.mask.sum().clamp_min(1)
        self.log_train_step(total.detach() / n, batch["input_ids"].shape[0], batch_idx)
        return total

    def trained_model(self) -> nn.Module:
        return self.model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        dm = getattr(self._trainer, "datamodule", None)
        if getattr(dm, "tokenizer_digest", None):
            checkpoint["kd_lm_tokenizer"] = dm.tokenizer_digest


def build_lm_teacher(spec: TeacherSpec, vocab: int, field: str) -> nn.Module:
    """A frozen decoder from a ``CausalLMModule`` checkpoint, or ``model`` (+ ``weights``)."""
    if spec.checkpoint:
        ckpt = read_checkpoint(
            spec.checkpoint,
            f"{field}.checkpoint",
            "train the teacher first (configs/llm/quickstart/teacher.yaml)",
        )
        hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        if "model" not in hparams or "state_dict" not in ckpt:
            raise ConfigError(
                f"{field}.checkpoint", spec.checkpoint, "this is not a CausalLMModule checkpoint"
            )
        # its own tokenizer's size (the data's, unless it is a cross-tokenizer teacher)
        vocab = _check_vocab(hparams.get("num_classes") or vocab, hparams.get("vocab_sizes"))
        model = build_causal_lm(
            hparams["model"], vocab, hparams.get("model_kwargs"), f"{field}.model"
        )
        state = {
            k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
        }
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                f"{field}.checkpoint",
                spec.checkpoint,
                "its weights do not fit "
                f"(another vocabulary or architecture?): {str(err).splitlines()[1:2]}",
            ) from None
        model.kd_tokenizer = ckpt.get("kd_lm_tokenizer")
    elif spec.model:
        digest, own = _folder_tokenizer(spec.model)
        vocab = own or vocab
        model = build_causal_lm(spec.model, vocab, spec.model_kwargs, f"{field}.model")
        if spec.weights:
            model.load_state_dict(read_checkpoint(spec.weights, f"{field}.weights", "fix the path"))
        model.kd_tokenizer = digest
    else:
        raise ConfigError(field, spec, "give a teacher `checkpoint` or a `model` (hf:<folder>)")
    model.kd_real_vocab = vocab  # its logits are cut to its tokenizer's tokens
    mark_untrained(model, spec, field)  # a built-in llama/gpt2 is random: refused at fit start
    return freeze(model)


def _folder_tokenizer(name: str) -> tuple[str | None, int]:
    """(digest, size) of the tokenizer saved beside an ``hf:`` model, if it has one."""
    if not name.startswith("hf:"):
        return None, 0
    from transformers import AutoTokenizer

    from kd_lightning.data.lm import tokenizer_digest

    try:
        tok = AutoTokenizer.from_pretrained(name[3:])
    except (OSError, ValueError):
        return None, 0
    return tokenizer_digest(tok), len(tok)


class LMDistillationModule(_CausalLMCore, FrozenTeacherModule):
    """A causal-LM student taught per completion token by one frozen teacher decoder.

    Args:
        student, student_kwargs: as ``CausalLMModule``'s ``model``/``model_kwargs``.
        teacher: ``TeacherSpec``: a ``CausalLMModule`` checkpoint, or ``model: hf:<folder>``.
        heads: ``kd_lightning.losses.lm`` heads; default TokenDivergence(forward_kl).
        init_from_teacher: ``matching`` or ``every_kth`` (every k-th decoder layer).
        chunk_size: > 0: the chunked loss (logits rebuilt per chunk, recomputed in backward).
        lora: ``LoRASpec``: LoRA adapters on the student (``peft``); only they train and
            only they (and any trainable head) are saved; the frozen base is rebuilt from
            ``student``/``init_from_teacher`` and checked against a fingerprint on load.
        sequence_kd: ``SequenceKDSpec``: train on the teacher's stored completions.
        on_policy: ``OnPolicySpec``: with probability ``lmbda`` per batch the student
            generates the completions it is trained on (see the module docstring).
        token_store: a top-k token store (``kd-lightning data store-teacher`` on this
            config; ``modules/lm_token_store.py``): training and validation read the
            teacher's distributions from it instead of running the teacher (a stage the
            store lacks, e.g. test, runs the live teacher). It is checked against this
            teacher's weights, the tokenizer and the chat template. It holds the teacher on
            the dataset's own completions, so it serves off-policy data only: on-policy
            generation and sequence KD are refused with it, and so is the chunked loss
            (``chunk_size`` must be 0: it rebuilds the teacher's logits from hidden states).
        token_store_tail: the mass outside the stored top-k: ``uniform`` (spread over the
            other tokens), ``drop`` (the top-k renormalised) or ``bucket`` (a (k + 1)-way
            distribution; TokenDivergence temperature 1). Exact at k = V. Eval metrics read
            the store with the ``uniform`` tail (full support, so teacher_nll is finite).
        allow_teacher_change, num_classes, input_shape, vocab_sizes, generate_samples,
        max_new_tokens, optimizer, lr_scheduler: as in the other modules.

    Cross-tokenizer pairs: when the data gives a teacher tokenizer (``teacher_tokenizer``,
    ``teacher_vocab_size``) other than the student's, and the teacher was trained with it (its
    checkpoint's tokenizer digest), the teacher runs on its own tokenization of each row and
    the heads get both outputs: ``ULDLoss``/``AlignedSpanLoss`` (and ``TokenCrossEntropy``);
    a same-vocabulary head, on-policy generation, sequence KD and a token store are refused.
    Eval then logs the student's metrics only (teacher_nll, kl, ... and the teacher's ROUGE-L
    would read the student's tokens).

    The teacher runs in inference mode, in bf16 autocast on a CUDA device that has it.
    Logs ``val/``/``test/`` ``nll``, ``ppl``, ``teacher_nll``, ``teacher_ppl`` and the
    teacher-forced ``kl`` (KL(teacher ‖ student), teacher entropy included),
    ``reverse_kl`` and ``jsd`` (β = 0.5), and at test ``rougeL``/``teacher_rougeL``.
    """

    monitor = "val/nll"

    def __init__(
        self,
        student: str = "llama",
        student_kwargs: dict[str, Any] | None = None,
        teacher: TeacherSpec | None = None,
        heads: list[TokenHead] | None = None,
        init_from_teacher: InitStrategy = "none",
        chunk_size: int = 0,
        allow_teacher_change: bool = False,
        num_classes: int = 0,
        input_shape: tuple[int, ...] = (64,),
        vocab_sizes: dict[str, int] | None = None,
        generate_samples: int = 16,
        max_new_tokens: int = 48,
        on_policy: OnPolicySpec | None = None,
        lora: LoRASpec | None = None,
        sequence_kd: SequenceKDSpec | None = None,
        token_store: str | None = None,
        token_store_tail: Literal["uniform", "drop", "bucket"] = "uniform",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "allow_teacher_change"])
        self.on_policy, self.sequence_kd = on_policy, sequence_kd
        self.token_store, self.token_store_tail = token_store, token_store_tail
        self._store: Any = None  # the opened LMTokenStore (setup)
        adaptive = on_policy is not None and on_policy.schedule == "adaptive"
        #: DistiLLM's adaptive schedule: threshold, reference loss, replay buffer of rows
        self._threshold = on_policy.init_threshold if adaptive else 0.0
        self._previous_loss: float | None = None
        self._replay: collections.deque = collections.deque(
            maxlen=on_policy.capacity if adaptive else 1
        )
        if on_policy is not None:
            on_policy.check()
        if sequence_kd is not None:
            check_engine(sequence_kd.engine, "model.sequence_kd.engine")
        self._engines: dict[str, Any] = {}  # field -> generation engine (models/lm_generate.py)
        self.allow_teacher_change = allow_teacher_change
        self.real_vocab = _check_vocab(num_classes, vocab_sizes)
        self.chunk_size, self.generate_samples = int(chunk_size), int(generate_samples)
        self.max_new_tokens = int(max_new_tokens)
        if isinstance(teacher, list):
            raise ConfigError("model.teacher", teacher, "the LM distiller takes one teacher")
        if teacher is None:
            raise ConfigError(
                "model.teacher", teacher, "give a teacher: {checkpoint: path/to.ckpt}"
            )
        self.student = build_causal_lm(student, self.real_vocab, student_kwargs, "model.student")
        self.set_teachers([build_lm_teacher(teacher, self.real_vocab, "model.teacher")], [1.0])
        self.teacher_vocab = getattr(self.teacher, "kd_real_vocab", self.real_vocab)
        #: the teacher reads its own tokenization of each row (set up from the data)
        self.cross_tokenizer = False
        self.init_report: InitReport | None = None
        if init_from_teacher != "none":
            self.init_report = copy_from_teacher(self.student, self.teacher, init_from_teacher)
        self.lora = lora
        if lora is not None:  # after init_from_teacher: the adapters sit on the copied weights
            self.student = apply_lora(self.student, lora, "model.lora")
            self.strict_loading = False  # checkpoints hold the adapters, not the frozen base
        self.heads = nn.ModuleList(heads if heads is not None else [TokenDivergence()])
        if not self.heads or not all(isinstance(h, TokenHead) for h in self.heads):
            raise ConfigError(
                "model.heads",
                [type(h).__name__ for h in self.heads],
                "give kd_lightning.losses.lm heads (TokenDivergence, TokenCrossEntropy, ...)",
            )
        for h in self.heads:
            if self.chunk_size > 0 and not h.chunkable and h.weight > 0:
                raise ConfigError(
                    "model.chunk_size",
                    chunk_size,
                    f"head {h.name!r} needs the full logits; set chunk_size: 0",
                )
            h.chunk_size = self.chunk_size
        lmbda = on_policy.lmbda if on_policy is not None and not adaptive else 0.0
        for h in self.heads:
            if getattr(h, "needs_on_policy", False) and lmbda < 1:
                raise ConfigError(
                    "model.on_policy.lmbda",
                    lmbda,
                    f"head {h.name!r} is a policy gradient on the student's own samples: "
                    "set model.on_policy: {lmbda: 1}",
                )
        self._hidden = any(isinstance(h, TokenHead) and not h.chunkable for h in self.heads)
        if token_store:
            self._check_token_store(on_policy, sequence_kd)
        self.val_sums, self.test_sums = self._eval_sums(), self._eval_sums()

    def _check_token_store(self, on_policy: Any, sequence_kd: Any) -> None:
        """What a token store cannot serve (see ``token_store`` in the class docstring)."""
        if self.token_store_tail not in ("uniform", "drop", "bucket"):
            raise ConfigError(
                "model.token_store_tail", self.token_store_tail, "use uniform, drop or bucket"
            )
        generates = on_policy is not None and (
            on_policy.lmbda > 0 or on_policy.schedule == "adaptive"
        )
        if generates:
            raise ConfigError(
                "model.on_policy",
                on_policy,
                "a token store holds the teacher on the dataset's completions only: "
                "remove model.token_store for on-policy training (the teacher must score them)",
            )
        if sequence_kd is not None:
            raise ConfigError(
                "model.sequence_kd",
                sequence_kd,
                "a token store holds the teacher on the dataset's completions, not on its own "
                "generations: remove model.token_store or model.sequence_kd",
            )
        if self.chunk_size > 0:
            raise ConfigError(
                "model.chunk_size",
                self.chunk_size,
                "the chunked loss rebuilds the teacher's logits from its hidden states, which "
                "a token store does not hold: set chunk_size: 0 with model.token_store",
            )
        for h in self.heads:
            if type(h) not in (TokenDivergence, TokenCrossEntropy):
                raise ConfigError(
                    "model.heads",
                    h.name,
                    "a token store serves TokenDivergence and TokenCrossEntropy heads only",
                )
            if self.token_store_tail == "bucket" and getattr(h, "temperature", 1.0) != 1.0:
                raise ConfigError(
                    "model.token_store_tail",
                    "bucket",
                    f"head {h.name!r} has temperature {h.temperature}: a tail bucket cannot be "
                    "re-tempered; use temperature 1 or the uniform/drop tail",
                )

    def stored_teacher(self, stage: str, batch: dict[str, Tensor], tail: str) -> TokenOutput:
        """The teacher's output on ``batch`` read from the token store: dense
        log-probabilities (``uniform``/``drop``), or no logits and the rows (``bucket``)."""
        if "index" not in batch:
            raise ConfigError(
                "model.token_store",
                self.token_store,
                "the batches carry no dataset `index`: use a PromptCompletionDataModule",
            )
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        if tail == "bucket":
            out = TokenOutput(None, mask, targets.clamp_min(0))
            out.stored_rows = self._store.batch_rows(stage, batch["index"], mask, targets)
            return out
        logits = self._store.dense_logits(stage, batch["index"], mask, targets, tail)
        return TokenOutput(logits, mask, targets.clamp_min(0))

    def _bucket_term(self, head: TokenHead, student: TokenOutput, teacher: TokenOutput) -> Tensor:
        from kd_lightning.modules.lm_token_store import store_token_loss

        kwargs = {k: v for k, v in head.fn.keywords.items() if k != "temperature"}
        s = student.logits[student.mask]
        loss = store_token_loss(s, teacher.stored_rows, head.divergence, "bucket", **kwargs)
        return loss.sum() * head.scale

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2), shard the student and the
        frozen teacher over the data-parallel mesh (``modules/sharding.py``); otherwise
        nothing."""
        from kd_lightning.modules.sharding import shard_distiller

        shard_distiller(self, self.device_mesh)

    def teacher_output(self, batch: dict[str, Tensor]) -> TokenOutput:
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        # FSDP2's all-gather buffers must not become inference tensors: no_grad when sharded
        no_grad = torch.no_grad() if is_sharded(self.teacher) else torch.inference_mode()
        if self.cross_tokenizer:  # its own tokens of the same rows (data.teacher_tokenizer)
            batch = {
                "input_ids": batch["teacher_input_ids"],
                "attention_mask": batch["teacher_attention_mask"],
                "labels": batch["teacher_labels"],
            }
        with no_grad, torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out = self.lm_output(self.teacher, batch, self._hidden, self.teacher_vocab)
        # out of inference mode (fp32), so the heads may save them for backward
        out = TokenOutput(
            None if out.logits is None else out.logits.float().clone(),
            out.mask,
            out.targets,
            tuple(h.float().clone() for h in out.hidden_states),
            None if is_sharded(self.teacher) else out.head_weight,
        )
        reshard_frozen(self.teacher)  # FSDP2 (configs/trainer/fsdp*.yaml) only
        return out

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None)
        saved, now, teacher_now = (
            getattr(self.teacher, "kd_tokenizer", None),
            getattr(dm, "tokenizer_digest", None),
            getattr(dm, "teacher_tokenizer_digest", None),
        )
        if teacher_now and saved and saved != teacher_now:
            raise ConfigError(
                "data.teacher_tokenizer",
                getattr(dm, "teacher_tokenizer_dir", None) or dm.teacher_tokenizer_name,
                "the teacher was trained with another tokenizer than this one: give the "
                "teacher's own (its vocab size in data.teacher_vocab_size, or its folder)",
            )
        if not teacher_now and saved and now and saved != now:
            raise ConfigError(
                "data.tokenizer",
                getattr(dm, "tokenizer_dir", None),
                "the teacher was trained with another tokenizer: give the data the teacher's "
                "tokenizer, or give it as data.teacher_tokenizer (data.teacher_vocab_size for "
                "MovieReviewsLMDataModule) and distil with ULDLoss or AlignedSpanLoss",
            )
        self.cross_tokenizer = bool(teacher_now and now and teacher_now != now)
        if self.cross_tokenizer:
            self._check_cross_tokenizer()
        elif self.teacher_vocab != self.real_vocab:
            raise ConfigError(
                "model.teacher",
                self.hparams.get("teacher"),
                f"its vocabulary has {self.teacher_vocab} tokens, the data's tokenizer "
                f"{self.real_vocab}: give the data the teacher's tokenizer, or give it as "
                "data.teacher_tokenizer and distil with ULDLoss or AlignedSpanLoss",
            )
        for h in self.heads:
            if getattr(h, "needs_byte_ends", False) and not teacher_now:
                raise ConfigError(
                    "model.heads",
                    h.name,
                    f"{type(h).__name__} aligns two tokenizations by bytes: give the data "
                    "data.teacher_tokenizer (or data.teacher_vocab_size)",
                )
        if self.token_store and self._store is None:
            self._store = self._open_store(dm)

    def _check_cross_tokenizer(self) -> None:
        """What a teacher of another tokenizer cannot serve: heads that compare the two
        models token by token in one vocabulary, and student- or teacher-generated
        completions (they would need re-tokenizing for the other model)."""
        for h in self.heads:
            if h.weight > 0 and not h.is_task_loss and not getattr(h, "cross_tokenizer", False):
                raise ConfigError(
                    "model.heads",
                    type(h).__name__,
                    "it compares the models token by token in one vocabulary and this "
                    "teacher has another tokenizer: use kd_lightning.losses.lm.ULDLoss or "
                    "AlignedSpanLoss",
                )
        spec = self.on_policy
        if spec is not None and (spec.lmbda > 0 or spec.schedule == "adaptive"):
            raise ConfigError(
                "model.on_policy",
                spec,
                "on-policy training with a teacher of another tokenizer is not supported",
            )
        for field, value in (
            ("model.sequence_kd", self.sequence_kd),
            ("model.token_store", self.token_store),
        ):
            if value:
                raise ConfigError(
                    field, value, "not supported with a teacher of another tokenizer: remove it"
                )

    def _open_store(self, dm: Any) -> Any:
        from kd_lightning.data.lm import tokenizer_digest
        from kd_lightning.modules.lm_token_store import LMTokenStore, chat_template_digest

        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(
                "model.token_store", self.token_store, "it needs a PromptCompletionDataModule"
            )
        fingerprint = {  # the teacher's SHA-256 was taken once, at build (set_teachers)
            "teacher": self.teacher_fingerprints[0],
            "tokenizer": tokenizer_digest(tokenizer),
            "chat_template": chat_template_digest(tokenizer),
        }
        store = LMTokenStore(self.token_store, fingerprint, "model.token_store")
        if store.vocab != self.real_vocab:
            raise ConfigError(
                "model.token_store",
                self.token_store,
                f"it holds {store.vocab} tokens, the data's tokenizer {self.real_vocab}",
            )
        return store

    def special_ids(self) -> tuple[int, int | None]:
        """(pad, eos) ids: the data's tokenizer's, else the student's config's."""
        tok = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
        config = self.student.config
        eos = tok.eos_token_id if tok is not None else config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        pad = tok.pad_token_id if tok is not None else config.pad_token_id
        return (eos if pad is None else pad), eos

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        spec: OnPolicySpec | SequenceKDSpec,
        field: str,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(prompts, completions) of ``batch``'s rows, completed by ``model`` through
        ``spec.engine`` (``hf``: ``generate`` with a KV cache, left-padded in chunks of
        ``spec.generation_batch_size``; ``vllm``) at ``spec``'s temperature/top_p/length,
        each completion cut after its first EOS."""
        pad, eos = self.special_ids()
        if pad is None:
            raise ConfigError(field, spec, "the tokenizer has neither a pad nor an EOS token")
        ids, attention = left_padded_prompts(batch, pad)
        engine = self.generation_engine(field, spec)
        version = "frozen" if model is self.teacher else self.global_step  # weights change
        generated = engine.generate(  # only at an optimizer step (or never: the teacher)
            model,
            ids,
            attention,
            spec,
            pad_id=pad,
            eos_id=eos,
            real_vocab=self.real_vocab,
            weights_version=version,
        )
        lens = prompt_lengths(batch).tolist()
        prompts = [batch["input_ids"][i, :n] for i, n in enumerate(lens)]
        return prompts, [g[completion_mask(g[None], eos)[0]] for g in generated]

    def generation_engine(self, field: str, spec: OnPolicySpec | SequenceKDSpec) -> Any:
        """``spec.engine`` for ``field``, built once (vllm is imported only here)."""
        engine = self._engines.get(field)
        if engine is None or engine.name != spec.engine:
            engine = self._engines[field] = make_engine(spec.engine, f"{field}.engine")
        return engine

    def generate_completions(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's prompts completed by the student (see ``OnPolicySpec``)."""
        prompts, completions = self.sample(self.student, batch, self.on_policy, "model.on_policy")
        return pack_sequences(prompts, completions, self.special_ids()[0])

    # -- sequence-level KD: the teacher's completions, generated once and stored -------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        spec = self.sequence_kd
        dm = getattr(self._trainer, "datamodule", None)
        if spec is None:
            return
        if dm is None or not hasattr(dm, "replace_completions"):
            raise ConfigError(
                "model.sequence_kd", spec, "it needs a PromptCompletionDataModule (data.*)"
            )
        train = dm.splits["train"]
        key = sequence_kd_key(self.teacher_fingerprints, dm.tokenizer_digest, spec, train)
        path = Path(spec.path)
        if self.trainer.is_global_zero:
            stored = torch.load(path, weights_only=True) if path.is_file() else None
            if stored is not None and stored["key"] != key and not spec.regenerate:
                raise ConfigError(
                    "model.sequence_kd.path",
                    spec.path,
                    "it holds teacher generations of another teacher, tokenizer, prompts or "
                    f"sampling settings ({stored['settings']}); set "
                    "model.sequence_kd.regenerate: true to replace them, or give another path",
                )
            if stored is None or stored["key"] != key:
                self._write_teacher_generations(path, key, spec, dm)
        self.trainer.strategy.barrier()
        stored = torch.load(path, weights_only=True)
        if stored["key"] != key:  # another rank's or process's file: never train on it
            raise ConfigError("model.sequence_kd.path", spec.path, "it changed while loading")
        dm.replace_completions("train", stored["completions"])

    def _write_teacher_generations(self, path, key, spec, dm) -> None:
        from kd_lightning.data.lm import PromptCompletionCollator

        collate = PromptCompletionCollator(self.special_ids()[0])
        train, out = dm.splits["train"], []
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the seed fixes the samples, not the run
            torch.manual_seed(spec.seed)
            step = max(spec.generation_batch_size, 1)
            for start in range(0, len(train), step):
                rows = [train[k] for k in range(start, min(start + step, len(train)))]
                batch = {k: v.to(self.device) for k, v in collate(rows).items()}
                _, completions = self.sample(self.teacher, batch, spec, "model.sequence_kd")
                out.extend(c.tolist() for c in completions)
        engine = self._engines.pop("model.sequence_kd", None)
        if engine is not None:
            engine.close()  # frees a vLLM engine's GPU memory before training
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(spec, k) for k in ("temperature", "top_p", "max_new_tokens", "seed")}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"key": key, "settings": settings, "completions": out}, tmp)
        tmp.replace(path)  # a crash mid-write leaves no half file under the real name

    def policy_action(self, batch_idx: int) -> str:
        """``generate``, ``replay`` or ``dataset`` for this batch (see ``OnPolicySpec``)."""
        spec = self.on_policy
        if spec is None:
            return "dataset"
        if spec.schedule == "gkd":
            return "generate" if spec.draw(self.current_epoch, batch_idx) else "dataset"
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return adaptive_action(
            spec.uniform(self.current_epoch, batch_idx),
            self._threshold,
            self.global_step,
            int(total) if total != float("inf") else 1,
            len(self._replay),
            spec.capacity,
            spec.replay_ratio,
        )

    def _to_replay(self, batch: dict[str, Tensor]) -> None:
        for ids, labels, n in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"].sum(1).tolist()
        ):
            completion = labels[:n] != -100
            self._replay.append((ids[:n][~completion].cpu(), ids[:n][completion].cpu()))

    def _from_replay(self, size: int, batch_idx: int) -> dict[str, Tensor]:
        spec = self.on_policy
        rng = random.Random(f"{spec.seed}:replay:{self.current_epoch}:{batch_idx}")
        rows = rng.sample(list(self._replay), k=min(size, len(self._replay)))
        return pack_sequences(
            [p.to(self.device) for p, _ in rows],
            [c.to(self.device) for _, c in rows],
            self.special_ids()[0],
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        action = self.policy_action(batch_idx)
        on_policy = action != "dataset"
        if action == "generate":
            # the loss, the teacher and the token count all read the generated sequences
            batch = self.generate_completions(batch)
            if self.on_policy.schedule == "adaptive":
                self._to_replay(batch)
        elif action == "replay":
            batch = self._from_replay(len(batch["input_ids"]), batch_idx)
        if self._store is not None:  # action is "dataset": on-policy is refused with a store
            teacher = self.stored_teacher("train", batch, self.token_store_tail)
        else:
            teacher = self.teacher_output(batch)
        student = self.lm_output(self.student, batch, hidden=self._hidden)
        total, terms = None, {}
        for head in self.heads:
            w = head.current_weight(self.current_epoch, self.global_step)
            if w == 0:
                continue
            if (
                self._store is not None
                and teacher.logits is None
                and isinstance(head, TokenDivergence)
            ):
                term = self._bucket_term(head, student, teacher)
            else:
                term = head(student, teacher, batch)
            terms[head.name] = term.detach()
            total = w * term if total is None else total + w * term
        if total is None:
            total = student.head_weight.sum() * 0.0
        self.count_tokens(student.mask)
        n = student.mask.sum().clamp_min(1)
        terms = {k: v / n for k, v in terms.items()}
        if self.on_policy is not None:  # epoch means: the on-policy share, completion length
            terms["on_policy"] = torch.tensor(float(on_policy), device=n.device)
            terms["completion_tokens"] = student.mask.sum(1).float().mean()
        self.log_train_step(total.detach() / n, batch["input_ids"].shape[0], batch_idx, terms)
        return total

    def trained_model(self) -> nn.Module:
        return self.student

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        spec = self.on_policy
        if spec is None or spec.schedule != "adaptive" or self.trainer.sanity_checking:
            return
        nll = self.trainer.callback_metrics.get("val/nll")
        if nll is not None:
            self._threshold, self._previous_loss = adaptive_threshold_update(
                self._threshold, self._previous_loss, float(nll), spec.loss_eps
            )

    # -- LoRA checkpoints: the adapters only ----------------------------------------------------
    def _frozen_student_keys(self) -> set[str]:
        return {f"student.{n}" for n, p in self.student.named_parameters() if not p.requires_grad}

    def lora_base_fingerprint(self) -> str:
        """Identifies the frozen base weights (shapes, sums and leading values of each)."""
        h = hashlib.sha256()
        for name, p in sorted(self.student.named_parameters()):
            if not p.requires_grad:
                flat = p.detach().float().flatten()
                h.update(f"{name}{tuple(p.shape)}{flat.sum().item():.6e}".encode())
                h.update(flat[:256].cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kd_adaptive_schedule"] = [self._threshold, self._previous_loss]
        if self.lora is None:
            return
        frozen = self._frozen_student_keys()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k not in frozen
        }
        checkpoint["kd_lora_base"] = self.lora_base_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kd_adaptive_schedule" in checkpoint:
            self._threshold, self._previous_loss = checkpoint["kd_adaptive_schedule"]
        saved = checkpoint.get("kd_lora_base")
        if self.lora is None and saved is None:
            return
        if self.lora is None or saved is None:
            raise ConfigError(
                "model.lora",
                self.lora,
                "the checkpoint was saved "
                + ("with" if saved else "without")
                + " LoRA adapters: use the same model.lora as the run that wrote it",
            )
        if saved != self.lora_base_fingerprint():
            raise ConfigError(
                "model.student",
                self.hparams.get("student"),
                "the LoRA checkpoint's adapters were trained on other base weights: "
                "build the same student (student, student_kwargs, init_from_teacher, seed)",
            )
        trainable = {k for k in self.state_dict() if k not in self._frozen_student_keys()}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(
                "ckpt_path", None, f"the LoRA checkpoint lacks trainable weights {missing[:3]}"
            )

    def teacher_model(self) -> nn.Module | None:
        # a teacher of another tokenizer: its per-token metrics (teacher_nll, kl, ...) and
        # ROUGE-L would read the student's tokens: the student's metrics only
        return None if self.cross_tokenizer else self.teacher

    def eval_teacher_output(self, batch: dict[str, Tensor]) -> TokenOutput | None:
        if self.cross_tokenizer:
            return None
        stage = "test" if self._trainer is not None and self.trainer.testing else "val"
        if self._store is not None and stage in self._store.stages:
            return self.stored_teacher(stage, batch, "uniform")
        return self.teacher_output(batch)


__all__ = [
    "CausalLMModule",
    "LMDistillationModule",
    "LoRASpec",
    "OnPolicySpec",
    "SequenceKDSpec",
    "adaptive_action",
    "adaptive_threshold_update",
    "build_lm_teacher",
    "completion_mask",
    "left_padded_prompts",
    "pack_sequences",
]
