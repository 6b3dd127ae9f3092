"""MiniLLM's sampled-token reverse KL: returns and policy gradient against the authors'
arithmetic (microsoft/LMOps@4f2a9deb5f08e459fd44c2e4792344d78ca89fc3
minillm/minillm/losses.py L27-L56 ``_get_advantages_and_returns``, L58-L96 ``_pg_loss``),
written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm.minillm import SampledReverseKL, discounted_returns
from kd_lightning.losses.outputs import TokenOutput
from kd_lightning.modules.lm_distillation import OnPolicySpec


def _their_advantages(rewards, mask, gamma):
    """losses.py L27-L56 with use_whitening=False."""
    rewards, mask = rewards.double(), mask.double()  # theirs: .float(); float64 here
    lens = torch.cumsum(mask, dim=-1)
    lens = mask - lens + lens[:, -1:None]
    lens = torch.masked_fill(lens, lens == 0, 1)
    last_rw, rw_reversed = 0, []
    for t in reversed(range(rewards.shape[1])):
        last_rw = rewards[:, t] + gamma * last_rw
        rw_reversed.append(last_rw)
    return torch.stack(rw_reversed[::-1], dim=1) / lens


def _their_pg_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2):
    """losses.py L58-L96 with w = 1."""
    n = mask.sum()
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.sum(torch.max(loss1, loss2) * mask) / n


def _response_batch(seed=0, b=3, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate([7, 4, 1]):  # completions of different lengths, padded after
        mask[i, :n] = True
    s_logits = torch.randn(b, t, v, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (b, t), generator=g)
    return s_logits, t_logits, targets, mask


@pytest.mark.parametrize("gamma", [0.0, 0.95, 1.0])
def test_returns_match_minillm(gamma):
    _, _, _, mask = _response_batch()
    rewards = torch.randn(mask.shape, dtype=torch.float64) * mask  # their pads carry reward 0
    ours = discounted_returns(rewards, mask, gamma, length_norm=True)
    theirs = _their_advantages(rewards, mask, gamma)
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-12, atol=1e-12)


def test_policy_gradient_matches_minillm_on_policy():
    s_logits, t_logits, targets, mask = _response_batch()
    out = lambda logits: TokenOutput(logits, mask, targets, (), None)  # noqa: E731
    ours = SampledReverseKL(gamma=0.95)(out(s_logits), out(t_logits), {}) / mask.sum()
    (g_ours,) = torch.autograd.grad(ours, s_logits)

    s_logp = F.log_softmax(s_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    t_logp = F.log_softmax(t_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    rewards = ((t_logp - s_logp) * mask).detach()  # teacher log-prob + (−student log-prob)
    advantages = _their_advantages(rewards, mask, 0.95)
    theirs = _their_pg_loss(s_logp, s_logp.detach(), advantages, mask)
    (g_theirs,) = torch.autograd.grad(theirs, s_logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_sampled_reverse_kl_requires_the_students_own_samples(tmp_path):
    from kd_lightning.modules.lm_distillation import LMDistillationModule
    from kd_lightning.modules.teacher import TeacherSpec
    from tests.test_lm_module import TINY, V

    spec = TeacherSpec(model="llama", model_kwargs=TINY, allow_untrained=True)
    for on_policy in (None, OnPolicySpec(lmbda=0.5)):
        with pytest.raises(ConfigError, match="lmbda"):
            LMDistillationModule(
                "llama",
                TINY,
                spec,
                heads=[SampledReverseKL()],
                num_classes=V,
                on_policy=on_policy,
            )
    # on the student's own samples it trains (one step, finite, the weights move)
    torch.manual_seed(0)
    module = LMDistillationModule(
        "llama",
        TINY,
        spec,
        heads=[SampledReverseKL()],
        num_classes=V,
        generate_samples=0,
        on_policy=OnPolicySpec(lmbda=1.0, max_new_tokens=4),
    )
    before = module.student.lm_head.weight.clone()
    from torch.utils.data import DataLoader

    from tests.test_lm_module import _trainer, _window

    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
        module, train_dataloaders=DataLoader([_window()], batch_size=None)
    )
    assert not torch.equal(before, module.student.lm_head.weight)
