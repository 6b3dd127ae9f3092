"""Per-token LM divergences: float64 brute force, the authors' arithmetic (TRL, torchtune,
DistiLLM, written out here from their files), and the chunked loss against the naive one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm import (
    TokenCrossEntropy,
    TokenDivergence,
    chunked_token_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from kd_lightning.losses.outputs import TokenOutput

B, T, V = 3, 7, 29


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return s, t, labels


def _brute(p, q):
    """KL(p ‖ q) for probability rows, a double loop in float64."""
    out = torch.zeros(p.shape[0], dtype=torch.float64)
    for n in range(p.shape[0]):
        out[n] = sum(
            p[n, v] * math.log(p[n, v] / q[n, v]) for v in range(p.shape[1]) if p[n, v] > 0
        )
    return out


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_divergence_equals_float64_brute_force(pair, temperature):
    s, t, _ = pair
    s, t = s.reshape(-1, V)[:6], t.reshape(-1, V)[:6]
    ps, pt = F.softmax(s / temperature, -1), F.softmax(t / temperature, -1)
    a, b = 0.1, 0.3
    expected = {
        "forward_kl": (forward_kl(s, t, temperature), _brute(pt, ps)),
        "reverse_kl": (reverse_kl(s, t, temperature), _brute(ps, pt)),
        "skew_kl": (skew_kl(s, t, a, temperature), _brute(pt, a * pt + (1 - a) * ps)),
        "skew_reverse_kl": (
            skew_reverse_kl(s, t, a, temperature),
            _brute(ps, a * ps + (1 - a) * pt),
        ),
        "tvd": (total_variation(s, t, temperature), 0.5 * (pt - ps).abs().sum(-1)),
        "jsd": (
            generalized_jsd(s, t, b, temperature),
            b * _brute(pt, (1 - b) * ps + b * pt) + (1 - b) * _brute(ps, (1 - b) * ps + b * pt),
        ),
    }
    for name, (ours, ref) in expected.items():
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12, msg=name)
    # true divergences: zero for identical distributions
    for fn in (forward_kl, reverse_kl, skew_kl, skew_reverse_kl, total_variation, generalized_jsd):
        assert fn(s, s).abs().max() < 1e-12


def _trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
    # huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8
    # trl/experimental/gkd/gkd_trainer.py L270-L318 (GKDTrainer.generalized_jsd_loss,
    # reduction="batchmean", num_items_in_batch=None), rewritten
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), 0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            m, s, reduction="none", log_target=True
        )
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


def _head_mean(head, s, t, labels):
    mask = labels != -100
    out_s = TokenOutput(s, mask, labels.clamp_min(0))
    out_t = TokenOutput(t, mask, labels.clamp_min(0))
    return head(out_s, out_t, {}) / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss_with_masks(pair, beta):
    s, t, labels = pair
    head = TokenDivergence(divergence="jsd", beta=beta, temperature=2.0)
    torch.testing.assert_close(
        _head_mean(head, s, t, labels),
        _trl_generalized_jsd_loss(s, t, labels, beta, 2.0),
        rtol=1e-10,
        atol=1e-12,
    )


def test_continuous_jsd_tends_to_trls_end_points(pair):
    s, t, _ = pair
    s, t = s.reshape(-1, V), t.reshape(-1, V)
    for beta, end in ((1e-10, forward_kl(s, t)), (1 - 1e-10, reverse_kl(s, t))):
        torch.testing.assert_close(
            generalized_jsd(s, t, beta, continuous=True), end, rtol=1e-5, atol=1e-6
        )
        # TRL's mixture form collapses to ~0 there instead: the jump the option removes
        assert generalized_jsd(s, t, beta).max() < 1e-5 < end.min()


def test_forward_and_reverse_kl_equal_torchtune(pair):
    s, t, labels = pair
    mask = (labels != -100).int().view(-1)
    # pytorch/torchtune@bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1
    # torchtune/modules/loss/kd_losses.py L47-L59 (ForwardKLLoss): -Σ p_t·log p_s, i.e. the
    # cross-entropy; ours adds the teacher's entropy back (a constant for the student)
    pt, ls = F.softmax(t, -1), F.log_softmax(s, -1)
    fkl_tt = -torch.sum((pt * ls).sum(-1).view(-1) * mask) / mask.sum()
    entropy = -torch.sum((pt * F.log_softmax(t, -1)).sum(-1).view(-1) * mask) / mask.sum()
    ours = _head_mean(TokenDivergence(divergence="forward_kl"), s, t, labels)
    torch.testing.assert_close(ours, fkl_tt - entropy, rtol=1e-10, atol=1e-12)
    # L98-L114 (ReverseKLLoss): Σ p_s·(log p_s − log p_t), a true KL
    ps, lt = F.softmax(s, -1), F.log_softmax(t, -1)
    rkl_tt = -torch.sum(((ps * lt) - (ps * ls)).sum(-1).view(-1) * mask) / mask.sum()
    ours = _head_mean(TokenDivergence(divergence="reverse_kl"), s, t, labels)
    torch.testing.assert_close(ours, rkl_tt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [0.1, 0.4])
def test_skew_losses_equal_distillm(pair, lam):
    s, t, labels = pair
    mask = (labels != -100).int().view(-1)
    pt, ps = F.softmax(t, -1), F.softmax(s, -1)
    # jongwooko/distillm@d47e77ff9d27721783b32213be38c1204230cc0a distillm/losses.py
    # L66-L78 skewed_forward_kl: -Σ p_t·log(λ p_t + (1 − λ) p_s), a cross-entropy (ours: KL)
    x = (pt * torch.log(lam * pt + (1 - lam) * ps)).sum(-1).view(-1)
    sfkl = -torch.sum(x * mask) / mask.sum()
    entropy = -torch.sum((pt * torch.log(pt)).sum(-1).view(-1) * mask) / mask.sum()
    ours = _head_mean(TokenDivergence(divergence="skew_kl", alpha=lam), s, t, labels)
    torch.testing.assert_close(ours, sfkl - entropy, rtol=1e-10, atol=1e-12)
    # L80-L94 skewed_reverse_kl: -Σ p_s·(log((1 − λ) p_t + λ p_s) − log p_s)
    mix = torch.log((1 - lam) * pt + lam * ps)
    x = ((ps * mix) - (ps * F.log_softmax(s, -1))).sum(-1).view(-1)
    srkl = -torch.sum(x * mask) / mask.sum()
    ours = _head_mean(TokenDivergence(divergence="skew_reverse_kl", alpha=lam), s, t, labels)
    torch.testing.assert_close(ours, srkl, rtol=1e-10, atol=1e-12)


def test_temperature_squared_is_explicit(pair):
    s, t, labels = pair
    plain = _head_mean(TokenDivergence(temperature=3.0), s, t, labels)
    scaled = _head_mean(TokenDivergence(temperature=3.0, t_squared=True), s, t, labels)
    torch.testing.assert_close(scaled, 9 * plain)


def test_bad_head_settings_are_config_errors():
    with pytest.raises(ConfigError, match="divergence"):
        TokenDivergence(divergence="kl")
    with pytest.raises(ConfigError, match="beta"):
        TokenDivergence(divergence="jsd", beta=1.5)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl", "tvd", "ce"])
def test_chunked_loss_equals_naive_with_a_ragged_last_chunk(divergence):
    g = torch.Generator().manual_seed(1)
    n, d_s, d_t, v = 37, 8, 12, 50  # 37 tokens in chunks of 8: the last chunk holds 5
    h_s = torch.randn(n, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(v + 6, d_s, generator=g, dtype=torch.float64, requires_grad=True)  # padded
    h_t = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    w_t = torch.randn(v, d_t, generator=g, dtype=torch.float64)
    weights = (torch.rand(n, generator=g) > 0.3).double()
    y = torch.randint(0, v, (n,), generator=g)
    if divergence == "ce":
        fn = TokenCrossEntropy().per_token
    else:
        fn = TokenDivergence(divergence=divergence, beta=0.3, temperature=2.0).per_token
    chunked = chunked_token_loss(h_s, w_s, h_t, w_t, weights, fn, y, chunk_size=8, vocab=v)
    naive = (fn(h_s @ w_s[:v].t(), h_t @ w_t.t(), y) * weights).sum()
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-6)
    g_chunked = torch.autograd.grad(chunked, (h_s, w_s))
    g_naive = torch.autograd.grad(naive, (h_s, w_s))
    for a, b in zip(g_chunked, g_naive):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_chunked_head_equals_naive_head_in_fp32():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 24, generator=g)
    ws, wt = torch.randn(40, 16, generator=g), torch.randn(40, 24, generator=g)
    mask = torch.rand(2, 9, generator=g) > 0.4
    y = torch.randint(0, 40, (2, 9), generator=g)
    head = TokenDivergence(divergence="jsd", beta=0.5)
    naive = head(TokenOutput(hs @ ws.t(), mask, y), TokenOutput(ht @ wt.t(), mask, y), {})
    head.chunk_size = 4
    chunked = head(TokenOutput(None, mask, y, (hs,), ws), TokenOutput(None, mask, y, (ht,), wt), {})
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
