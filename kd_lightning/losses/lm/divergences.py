"""Per-token divergences between a student's and a teacher's next-token distributions.

Each function takes logits of shape ``[N, V]`` (one row per token; the caller has already
selected the completion tokens or weights them itself) and returns ``[N]`` in fp32 (float64 for float64 inputs): one
short, auditable function per divergence, in the manner of TRL's ``generalized_jsd_loss``.
Temperature divides both logits before the softmax; any T² factor is the head's business
(``TokenDivergence.t_squared``), never hidden in here. Every value is a true divergence:
zero when the two distributions are equal, the teacher's entropy included (DistiLLM's
``skewed_forward_kl`` returns the cross-entropy instead; the two differ by a constant of the
student's parameters, so their gradients are the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _f32(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 logits are upcast; float64, as in the parity tests, stays)."""
    return x if x.dtype == torch.float64 else x.float()


def _log_probs(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    return (
        F.log_softmax(_f32(student) / temperature, -1),
        F.log_softmax(_f32(teacher) / temperature, -1),
    )


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row, with 0·log 0 = 0 (a -inf logit, e.g. a masked vocabulary entry)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), p.new_zeros(())).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_b: float) -> Tensor:
    """log((1 − w)·a + w·b), stably."""
    if weight_b <= 0.0:
        return log_a
    if weight_b >= 1.0:
        return log_b
    return torch.logaddexp(log_a + math.log1p(-weight_b), log_b + math.log(weight_b))


def forward_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher ‖ student): mean-seeking; Hinton's KD per token."""
    s, t = _log_probs(student, teacher, temperature)
    return _kl(t, s)


def reverse_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(student ‖ teacher): mode-seeking (MiniLLM's objective, teacher-forced)."""
    s, t = _log_probs(student, teacher, temperature)
    return _kl(s, t)


def generalized_jsd(
    student: Tensor,
    teacher: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    continuous: bool = False,
) -> Tensor:
    """GKD's generalized JSD (Agarwal et al. 2024, eq. 1) as TRL computes it: with the
    mixture m = (1 − β)·student + β·teacher, β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m);
    at β = 0 and β = 1 TRL switches to KL(teacher ‖ student) and KL(student ‖ teacher),
    where the mixture formula tends to 0 instead.

    ``continuous``: divide the mixture form by β(1 − β). That quotient tends to exactly
    TRL's end-point KLs as β → 0 and β → 1, so the loss scale no longer jumps at the ends
    (at β = 0.5 it is 4× TRL's)."""
    s, t = _log_probs(student, teacher, temperature)
    if beta <= 0.0:
        return _kl(t, s)
    if beta >= 1.0:
        return _kl(s, t)
    m = _mix(s, t, beta)
    jsd = beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    return jsd / (beta * (1.0 - beta)) if continuous else jsd


def skew_kl(
    student: Tensor, teacher: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM's skew KL (Ko et al. 2024, eq. 4): KL(teacher ‖ α·teacher + (1 − α)·student)."""
    s, t = _log_probs(student, teacher, temperature)
    return _kl(t, _mix(s, t, alpha))


def skew_reverse_kl(
    student: Tensor, teacher: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM's skew reverse KL: KL(student ‖ α·student + (1 − α)·teacher)."""
    s, t = _log_probs(student, teacher, temperature)
    return _kl(s, _mix(t, s, alpha))


def total_variation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Total variation distance ½·Σ|teacher − student| (DistiLLM's ``tv_distance``)."""
    s, t = _log_probs(student, teacher, temperature)
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


#: name → function, for ``TokenDivergence(divergence=...)``
DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": total_variation,
}
