"""MiniLLM's sampled-token reverse KL (Gu et al. 2024), as a per-token policy-gradient head.

MiniLLM minimises the sequence-level reverse KL KL(q_θ ‖ p) of the student q_θ from the
teacher p over the student's own samples y. Its policy gradient needs, per sampled token,
only the teacher's log-probability of that token: the reward is
r_t = log p(y_t | y_<t) − log q_θ(y_t | y_<t), the return is discounted and divided by the
number of tokens it sums over,

    R_t = (Σ_{k ≥ t} γ^{k−t} r_k) / |{k ≥ t}|,

and the loss's gradient is −Σ_t sg(R_t) ∇log q_θ(y_t | y_<t). This is MiniLLM's
``_get_advantages_and_returns`` (without whitening) and the PPO objective ``_pg_loss`` at
the on-policy point (ratio 1, so the clip is inactive and the gradient is −R_t ∇log q_θ):
microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3 minillm/minillm/losses.py
L27-L56 and L58-L96; rewards r_t = teacher log-prob (minillm/minillm/reward.py L63-L74)
+ (−student log-prob) (minillm/minillm/sampler.py L77-L124); γ = 0.95:
minillm/arguments.py L158. Not included:
PPO's multi-epoch reuse of old samples, the teacher-mixed sampling and the single-step
regulariser (use a ``TokenDivergence(reverse_kl)`` head beside it for the latter).

The samples must be the student's: use it with ``model.on_policy.lmbda: 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm.heads import TokenHead
from kd_lightning.losses.outputs import TokenOutput
from kd_lightning.losses.schedules import Schedule


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float, length_norm: bool) -> Tensor:
    """R_t = Σ_{k ≥ t} γ^{k−t} r_k over each row's masked positions, divided (when
    ``length_norm``) by how many masked positions lie at or after t. [B, T] → [B, T]."""
    rewards = torch.where(mask, rewards, rewards.new_zeros(()))
    out, running = torch.empty_like(rewards), rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    if length_norm:
        m = mask.to(rewards.dtype)
        remaining = m.flip(1).cumsum(1).flip(1)
        out = out / remaining.clamp_min(1)
    return out


def sampled_token_logprobs(out: TokenOutput) -> Tensor:
    """log-probability of each target token, [B, T] (full logits needed)."""
    if out.logits is None:
        raise ConfigError("model.chunk_size", "> 0", "SampledReverseKL needs chunk_size: 0")
    logits = out.logits
    logp = F.log_softmax(logits.float() if logits.element_size() < 4 else logits, dim=-1)
    return logp.gather(-1, out.targets.unsqueeze(-1)).squeeze(-1)


class SampledReverseKL(TokenHead):
    """MiniLLM's policy gradient of the reverse KL on the student's own samples.

    Args:
        gamma: the return's discount (MiniLLM's default 0.95).
        length_norm: divide each return by the tokens it sums over (MiniLLM's
            ``_get_advantages_and_returns``).
        weight, schedule, name: as every head.

    Returns the sum over completion tokens of −sg(R_t)·q_θ(y_t)/sg(q_θ(y_t)): the value is
    −Σ R_t, the gradient −Σ R_t ∇log q_θ(y_t) (the module divides by the window's token
    count). Only the teacher's log-probability of each sampled token is
    read from the teacher.
    """

    default_name = "minillm"
    chunkable = False
    needs_on_policy = True
    reference = (
        "microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3 minillm/minillm/losses.py L27-L96"
    )

    def __init__(
        self,
        weight: float = 1.0,
        gamma: float = 0.95,
        length_norm: bool = True,
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name)
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError("SampledReverseKL.gamma", gamma, "use a discount in [0, 1]")
        self.gamma, self.length_norm = float(gamma), bool(length_norm)

    def forward(self, student: TokenOutput, teacher: TokenOutput | None, batch: dict) -> Tensor:
        if teacher is None:
            raise ConfigError("model.heads", self.name, "SampledReverseKL needs a teacher")
        mask = student.mask
        s_logp = sampled_token_logprobs(student)
        with torch.no_grad():
            rewards = sampled_token_logprobs(teacher) - s_logp.detach()
            returns = discounted_returns(rewards, mask, self.gamma, self.length_norm)
        # MiniLLM's importance ratio at the on-policy point: 1 in value, ∇log q in gradient,
        # so the value is −Σ R_t (their pg_loss · n) and the gradient −Σ R_t ∇log q_θ(y_t)
        ratio = torch.exp(s_logp - s_logp.detach())
        return -torch.where(mask, returns * ratio, s_logp.new_zeros(())).sum()
