"""Statistics of a causal LM's free-running (greedy) completions, for the test step.

Pure functions on lists of completions and per-step divergences; the LM modules
(``modules/lm_distillation.py``) generate, score and log them as ``test/gen_len``,
``test/distinct_1``, ``test/distinct_2`` and ``test/exposure_bias``.

* **length**: the mean number of generated tokens per completion (EOS and padding excluded).
* **distinct-n** (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models", NAACL, §4.2): the number of distinct n-grams over *all* completions
  of the eval set divided by the total number of n-grams in them (n-grams never cross from
  one completion to the next). Computed on whitespace-separated words of the decoded text,
  as Li et al. count words.
* **ExAccErr** (Arora et al. 2022, "Why Exposure Bias Matters: An Imitation Learning
  Perspective of Error Accumulation in Language Generation", Findings of ACL, §3–4; the
  form MiniLLM (Gu et al., ICLR 2024, App. B.5 eqs. 30–32) and DistiLLM (Ko et al., ICML
  2024) report, with the teacher as the oracle):

  - the per-step error at a prefix is KL(teacher ‖ student) of the next-token distributions
    there, ``E_{y_t ~ p}[log p(y_t | y_<t) − log q(y_t | y_<t)]``;
  - the accumulated regret ``R(l) = Σ_{t ≤ l} E_{y_<t ~ q}[KL_t]``: prefixes from the
    *student's own* free-running completions;
  - the teacher-forced per-step error ``ε(l) = (1/l) Σ_{t ≤ l} E_{y_<t ~ p}[KL_t]``:
    prefixes from the *teacher's* completions (the oracle's data);
  - ``ExAccErr(l) = (R(l) − l·ε(l)) / (l·ε(l)) × 100 %``: the excess error that comes from
    the student reading its own prefixes instead of the oracle's.

  Neither jongwooko/distillm (d47e77f) nor the authors' kushalarora/quant_exp_bias holds
  this exact ratio, so it is the papers' formula. The per-step error is the authors' one:
  kushalarora/quant_exp_bias@663ed81 quant_exp_bias/metrics/exposure_bias_v2.py L80–L99
  takes ``F.kl_div(model log-probs, oracle probs)`` = KL(oracle ‖ model) at every step of a
  model-sampled prefix and accumulates it over steps (``idx2Q[j] += df_p_q_seq``), as
  ``R(l)`` does here. Two choices are ours and stated: the expectations over prefixes are the
  eval set's greedy completions (MiniLLM samples 10 per prompt; greedy is deterministic and
  the same completions the ROUGE-L, length and distinct-n numbers use), and a position t
  averages over the completions that reach it (completions end at EOS at different lengths),
  with l the longest length both sets reach (at most ``max_new_tokens``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_length(completions: Sequence[Sequence[object]]) -> float | None:
    """The mean number of tokens per completion (None for no completions)."""
    if not completions:
        return None
    return sum(len(c) for c in completions) / len(completions)


def distinct_n(completions: Sequence[Sequence[Hashable]], n: int) -> float | None:
    """Distinct n-grams / all n-grams over every completion (Li et al. 2016); None when the
    completions hold no n-gram at all."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[Hashable, ...]] = set()
    total = 0
    for c in completions:
        grams = [tuple(c[i : i + n]) for i in range(len(c) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else None


def words(texts: Sequence[str]) -> list[list[str]]:
    """Whitespace-separated words of each decoded completion (what distinct-n counts)."""
    return [t.split() for t in texts]


def step_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(teacher ‖ student) per row of ``[T, V]`` logits (fp32), ``[T]``."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def position_means(per_step: Sequence[Tensor]) -> Tensor:
    """Mean over the sequences that reach each position t (``[max_len]``)."""
    longest = max((len(x) for x in per_step), default=0)
    sums, counts = torch.zeros(longest, dtype=torch.float64), torch.zeros(longest)
    for x in per_step:
        sums[: len(x)] += x.double().cpu()
        counts[: len(x)] += 1
    return sums / counts.clamp_min(1)


def exposure_bias(
    student_prefix_kl: Sequence[Tensor],
    teacher_prefix_kl: Sequence[Tensor],
    length: int | None = None,
) -> dict[str, float] | None:
    """ExAccErr (%) with the teacher as the oracle, from per-step KL(teacher ‖ student):

    Args:
        student_prefix_kl: per completion the student generated, ``[len_i]`` KL at each of
            its steps (prefix: prompt + the student's own earlier tokens).
        teacher_prefix_kl: the same along the teacher's completions (teacher-forced prefixes).
        length: the l to report at (default: the longest both sets reach).

    Returns ``{"exposure_bias": ExAccErr %, "regret": R(l), "step_error": ε(l), "length": l}``,
    or None when there is no step to compare or ε(l) is 0 (the student is the teacher)."""
    a, b = position_means(student_prefix_kl), position_means(teacher_prefix_kl)
    l_max = min(len(a), len(b))
    if length is not None:
        l_max = min(l_max, int(length))
    if l_max < 1:
        return None
    regret, eps = float(a[:l_max].sum()), float(b[:l_max].mean())
    if eps <= 0:
        return None
    return {
        "exposure_bias": 100.0 * (regret - l_max * eps) / (l_max * eps),
        "regret": regret,
        "step_error": eps,
        "length": float(l_max),
    }


__all__ = [
    "distinct_n",
    "exposure_bias",
    "mean_length",
    "position_means",
    "step_kl",
    "words",
]
