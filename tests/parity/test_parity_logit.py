"""Parity of the logit heads with their authors' code (issue 20).

Each reference below is the arithmetic of the cited file, written here from its source (never
imported), evaluated on the same seeded float64 logits as the head. Values and gradients w.r.t.
the student logits and every trainable head parameter (CTKD's temperature θ) must agree at
1e-6 relative. Logit heads have no shape relations beyond the batch and class counts, so each
runs at a few (N, C), including N > C, N < C and a confident teacher.

Sources (full commits):
  LS  = sunshangquan/logit-standardization-KD@f6e5aa5172bad618e801163c3385322eea673754
  MD  = megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259
  RD  = HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403
  IC  = hunto/image_classification_sota@6f7a70a1dd57fd88413d83909d3d53243068f701 (the
        classification code of hunto/DIST_KD@2418f18b1fedd7c2646a7b1b9a27d5c674c2170b, a
        submodule there)
  CT  = zhengli97/CTKD@7d5252241259ae70d38a832371fed9697d15fc14
  ML  = Jin-Ying/Multi-Level-Logit-Distillation@5ee473fcf193dfb00a0598b64d0acfe6ad58a482
  TTM = zkxufo/TTM@fe457b33a71ba27536ec04fe3d32c5b04963522f
CE, LogitMSE and PseudoLabel have no authors' repository: they reference the standard formula
(the textbook cross-entropy, Ba & Caruana 2014's squared error, FixMatch's thresholded
pseudo-label CE), written out here rather than taken from torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses import (
    CTKD,
    DIST,
    DKD,
    MLKD,
    WTTM,
    CrossEntropy,
    KLDivergence,
    LogitMSE,
    PseudoLabel,
)
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from tests.parity.compare import assert_grads, assert_rel

#: (N, C): more samples than classes, fewer, and equal
SIZES = {"n_gt_c": (12, 5), "n_lt_c": (4, 10), "n_eq_c": (6, 6)}


def logits(seed: int, n: int, c: int, t_scale: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    z_t = torch.randn(n, c, generator=g, dtype=torch.float64) * t_scale
    label = torch.randint(0, c, (n,), generator=g)
    return z_s, z_t, label




def check(
    head,
    z_s: Tensor,
    z_t: Tensor,
    reference: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor],
    batch: dict[str, Tensor] | None = None,
) -> Tensor:
    """Value and gradients (student logits, every trainable head parameter) agree."""
    head = head.double()
    params = {k: p for k, p in head.named_parameters() if p.requires_grad}
    ref_params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    s_head, s_ref = z_s.clone().requires_grad_(), z_s.clone().requires_grad_()
    loss = head(ModelOutput(s_head), TeacherOutput([ModelOutput(z_t)]), batch or {})
    want = reference(s_ref, z_t, ref_params)
    assert loss.dtype == torch.float64
    assert_rel(loss.detach(), want.detach(), "value")
    inputs_h, inputs_r = [s_head, *params.values()], [s_ref, *ref_params.values()]
    names = ["student logits", *params]
    assert_grads(loss, want, inputs_h, inputs_r, names)
    return loss.detach()


# -- KD and LS ----------------------------------------------------------------------------
def ls_normalize(logit: Tensor) -> Tensor:
    """LS mdistiller/distillers/KD.py L7-L10."""
    mean = logit.mean(dim=-1, keepdim=True)
    stdv = logit.std(dim=-1, keepdim=True)
    return (logit - mean) / (1e-7 + stdv)


def ref_kd(z_s: Tensor, z_t: Tensor, temperature: float, logit_stand: bool) -> Tensor:
    """LS mdistiller/distillers/KD.py L12-L19 (with logit_stand off this is MD's KD.py
    ``kd_loss`` and RD distiller_zoo/KD.py L13-L17)."""
    z_s = ls_normalize(z_s) if logit_stand else z_s
    z_t = ls_normalize(z_t) if logit_stand else z_t
    log_pred_student = F.log_softmax(z_s / temperature, dim=1)
    pred_teacher = F.softmax(z_t / temperature, dim=1)
    loss = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss * temperature**2


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ls", [False, True], ids=["kd", "kd_ls"])
def test_kd(size, ls):
    z_s, z_t, _ = logits(0, *SIZES[size])
    t = 2.0 if ls else 4.0
    head = KLDivergence(temperature=t, logit_standardization=ls)
    check(head, z_s, z_t, lambda s, t_, p: ref_kd(s, t_, t, ls))


# -- DKD ----------------------------------------------------------------------------------
def ref_dkd(z_s, z_t, target, alpha, beta, temperature, logit_stand):
    """LS mdistiller/distillers/DKD.py L7-L39 and L42-L58 (``normalize``, ``dkd_loss``,
    ``_get_gt_mask``, ``_get_other_mask``, ``cat_mask``); without LS it is
    MD mdistiller/distillers/DKD.py L8-L51."""
    z_s = ls_normalize(z_s) if logit_stand else z_s
    z_t = ls_normalize(z_t) if logit_stand else z_t
    gt_mask = torch.zeros_like(z_s).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(z_s).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, m1, m2):
        return torch.cat([(t * m1).sum(1, keepdim=True), (t * m2).sum(1, keepdim=True)], dim=1)

    pred_student = cat_mask(F.softmax(z_s / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(z_t / temperature, dim=1), gt_mask, other_mask)
    tckd = (
        F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(z_t / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(z_s / temperature - 1000.0 * gt_mask, dim=1)
    nckd = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ls", [False, True], ids=["dkd", "dkd_ls"])
def test_dkd(size, ls):
    z_s, z_t, label = logits(1, *SIZES[size])
    alpha, beta, t = (9.0, 72.0, 2.0) if ls else (1.0, 8.0, 4.0)
    head = DKD(alpha=alpha, beta=beta, temperature=t, logit_standardization=ls)
    check(
        head, z_s, z_t, lambda s, t_, p: ref_dkd(s, t_, label, alpha, beta, t, ls), {"label": label}
    )


# -- DIST ---------------------------------------------------------------------------------
def ref_dist(z_s: Tensor, z_t: Tensor, beta: float, gamma: float, tau: float) -> Tensor:
    """IC lib/models/losses/dist_kd.py L4-L34."""

    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau**2 * inter_class_relation(y_s, y_t)
    intra = tau**2 * inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
    return beta * inter + gamma * intra


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("setting", [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0)], ids=["imagenet", "cifar"])
def test_dist(size, setting):
    beta, gamma, tau = setting
    z_s, z_t, _ = logits(2, *SIZES[size])
    check(
        DIST(beta=beta, gamma=gamma, temperature=tau),
        z_s,
        z_t,
        lambda s, t, p: ref_dist(s, t, beta, gamma, tau),
    )


# -- CTKD ---------------------------------------------------------------------------------
def ct_cosine_decay(i: int, max_value: float = 0.0, min_value: float = -1.0, loops: int = 10):
    """CT train_student.py L186-L202 (``CosineDecay.get_value``)."""
    i = min(max(i, 0), loops)
    value = (math.cos(i * math.pi / loops) + 1.0) * 0.5
    return value * (max_value - min_value) + min_value


class _CTGrl(torch.autograd.Function):
    """CT models/temp_global.py L21-L36: identity forward, ``lambda_ * grads`` backward."""

    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        return grads.new_tensor(ctx.lambda_) * grads, None


def ref_ctkd(z_s, z_t, theta, epoch_1based, t_start=1.0, t_end=20.0):
    """CT helper/loops.py L132-L141 (``temp = t_start + t_end · sigmoid(global_T)`` through the
    reversal layer at ``cos_value``) and distiller_zoo/KD.py L13-L20 (``DistillKL``), with
    train_student.py L402-L421 (``get_value(epoch)`` for ``epoch in range(1, epochs + 1)``)."""
    temp = _CTGrl.apply(theta, ct_cosine_decay(epoch_1based))
    temp = t_start + t_end * torch.sigmoid(temp)
    log_p = F.log_softmax(z_s / temp, dim=1)
    return F.kl_div(log_p, F.softmax(z_t / temp, dim=1), reduction="batchmean") * temp * temp


def test_ctkd_lambda_follows_the_reference_1_based_epochs():
    """Issue 20 §1: Lightning's first epoch (0) is CTKD's epoch 1."""
    head = CTKD(lambda_epochs=10)
    assert head.reversal_strength(0) == pytest.approx(0.0244717, rel=1e-5)
    assert head.reversal_strength(0) == pytest.approx(-ct_cosine_decay(1), rel=1e-12)
    assert head.reversal_strength(9) == 1.0  # the tenth epoch: full strength
    for e in range(15):
        assert head.reversal_strength(e) == pytest.approx(-ct_cosine_decay(e + 1), abs=1e-15)


@pytest.mark.parametrize("epoch", [0, 4, 9, 30])
@pytest.mark.parametrize("size", SIZES)
def test_ctkd(epoch, size):
    z_s, z_t, _ = logits(3, *SIZES[size])
    head = CTKD(theta_init=1.0, lambda_epochs=10)
    head.current_weight(epoch, 0)
    check(head, z_s, z_t, lambda s, t, p: ref_ctkd(s, t, p["theta"], epoch + 1))


# -- MLKD ---------------------------------------------------------------------------------
def ml_kd(z_s, z_t, temperature, logit_stand=False):
    """ML mdistiller/distillers/KD_ours.py L13-L21 (LS MLKD.py L17-L28 adds ``logit_stand``)."""
    z_s = ls_normalize(z_s) if logit_stand else z_s
    z_t = ls_normalize(z_t) if logit_stand else z_t
    log_pred_student = F.log_softmax(z_s / temperature, dim=1)
    pred_teacher = F.softmax(z_t / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature**2


def ml_cc(z_s, z_t, temperature):
    """ML KD_ours.py L24-L34."""
    class_num = z_t.shape[1]
    p_s, p_t = F.softmax(z_s / temperature, dim=1), F.softmax(z_t / temperature, dim=1)
    return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / class_num


def ml_bc(z_s, z_t, temperature):
    """ML KD_ours.py L37-L47."""
    batch_size = z_t.shape[0]
    p_s, p_t = F.softmax(z_s / temperature, dim=1), F.softmax(z_t / temperature, dim=1)
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / batch_size


def ref_mlkd(sw, tw, ss, ts, t_base, w, ls, slip=True):
    """ML KD_ours.py L96-L255 (LS MLKD.py L97-L273): ``loss_kd + loss_cc + loss_bc`` of its
    ``losses_dict`` (the CE term is the CrossEntropy head's); ``w`` = ``kd_loss_weight``."""
    pred_teacher_weak = F.softmax(tw.detach(), dim=1)
    confidence = pred_teacher_weak.max(dim=1).values
    mask = confidence.le(float(np.percentile(confidence.numpy().flatten(), 50)))
    class_confidence = pred_teacher_weak.sum(dim=0)
    class_mask = class_confidence.le(float(np.percentile(class_confidence.numpy().flatten(), 50)))
    temps = [t_base, 3.0, 5.0, 2.0, 6.0]
    kd_weak = sum(w * (ml_kd(sw, tw, t, ls) * mask).mean() for t in temps)
    # L142-L162: the 4th and 5th strong terms read the weak logits (the copy slip)
    kd_strong = sum(
        w * (ml_kd(sw, tw, t, ls) if slip and k >= 3 else ml_kd(ss, ts, t, ls))
        for k, t in enumerate(temps)
    )
    cc_weak = sum(w * (ml_cc(sw, tw, t) * class_mask).mean() for t in temps)
    bc_weak = sum(w * (ml_bc(sw, tw, t) * mask).mean() for t in temps)
    return kd_weak + kd_strong + cc_weak + bc_weak


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ls", [False, True], ids=["mlkd", "mlkd_ls"])
@pytest.mark.parametrize("slip", [True, False], ids=["slip", "no_slip"])
def test_mlkd(size, ls, slip):
    n, c = SIZES[size]
    z_w, t_w, _ = logits(4, n, c)
    z_st, t_st, _ = logits(5, n, c)
    t_base = 2.0 if ls else 4.0
    temps = [t_base, 3.0, 5.0, 2.0, 6.0]
    head = MLKD(weight=1.0, temperatures=temps, logit_standardization=ls, strong_view_slip=slip)
    z_s, z_t = torch.cat([z_w, z_st]), torch.cat([t_w, t_st])
    strong = torch.tensor([False] * n + [True] * n)
    w = 9.0  # the head's weight is applied by the module: compare at the reference's weight
    check(
        head,
        z_s,
        z_t,
        lambda s, t, p: ref_mlkd(s[:n], t[:n], s[n:], t[n:], t_base, w, ls, slip) / w,
        {"strong_view": strong},
    )


# -- WTTM ---------------------------------------------------------------------------------
def ref_wttm(y_s: Tensor, y_t: Tensor, l: float) -> Tensor:  # noqa: E741 (the reference's name)
    """TTM distiller_zoo/wttm.py L13-L21."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    kl = torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1)
    return torch.mean(norm * kl)


def ref_ttm(y_s: Tensor, y_t: Tensor, l: float) -> Tensor:  # noqa: E741
    """TTM distiller_zoo/ttm.py L13-L21: the same without the ``norm`` weight."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    p_t = p_t / p_t.sum(dim=1, keepdim=True)
    return F.kl_div(p_s, p_t, reduction="none").sum(dim=1).mean()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gamma", [0.1, 0.5])
@pytest.mark.parametrize("weighted", [True, False], ids=["wttm", "ttm"])
def test_wttm(size, gamma, weighted):
    z_s, z_t, _ = logits(6, *SIZES[size])
    ref = ref_wttm if weighted else ref_ttm
    check(WTTM(gamma=gamma, weighted=weighted), z_s, z_t, lambda s, t, p: ref(s, t, gamma))


# -- CE, LogitMSE, PseudoLabel ------------------------------------------------------------
def ref_ce(z: Tensor, label: Tensor, eps: float) -> Tensor:
    """Cross-entropy with label smoothing (Szegedy et al. 2016, §7): the target is
    (1 - ε)·onehot + ε/C, the loss -Σ target·log softmax, averaged over the samples."""
    log_p = z - z.logsumexp(dim=1, keepdim=True)
    target = (1 - eps) * F.one_hot(label, z.shape[1]).to(z) + eps / z.shape[1]
    return -(target * log_p).sum(dim=1).mean()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy(size, eps):
    z_s, z_t, label = logits(7, *SIZES[size])
    head = CrossEntropy(label_smoothing=eps)
    check(head, z_s, z_t, lambda s, t, p: ref_ce(s, label, eps), {"label": label})


@pytest.mark.parametrize("size", SIZES)
def test_logit_mse(size):
    """Ba & Caruana 2014 (§2.2): regress the logits, 1/(N·C) Σ (z_s - z_t)²."""
    z_s, z_t, _ = logits(8, *SIZES[size])
    n, c = z_s.shape
    check(LogitMSE(), z_s, z_t, lambda s, t, p: ((s - t) ** 2).sum() / (n * c))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("thresholded", [False, True])
def test_pseudo_label(size, thresholded):
    """FixMatch (Sohn et al. 2020, eq. 4): 1/N Σ 1[max q ≥ τ] · H(argmax q, p_s)."""
    z_s, z_t, _ = logits(9, *SIZES[size])
    q = torch.exp(z_t - z_t.logsumexp(dim=1, keepdim=True))
    conf, hard = q.max(dim=1)
    # a threshold between two confidences, so that both kinds of sample occur
    threshold = float(conf.sort().values[len(conf) // 2 - 1 : len(conf) // 2 + 1].mean())
    threshold = threshold if thresholded else 0.0
    assert not thresholded or 0 < int((conf >= threshold).sum()) < len(conf)

    def ref(s, t, p):
        nll = -(s - s.logsumexp(dim=1, keepdim=True)).gather(1, hard[:, None]).squeeze(1)
        return ((conf >= threshold).to(s) * nll).sum() / len(s)

    check(PseudoLabel(threshold=threshold), z_s, z_t, ref)


# -- every head names its reference -------------------------------------------------------
@pytest.mark.parametrize(
    "cls", [KLDivergence, DKD, DIST, CTKD, MLKD, WTTM, CrossEntropy, LogitMSE, PseudoLabel]
)
def test_logit_heads_name_their_reference(cls):
    assert cls.reference, cls
    for sentence in cls.departures:
        option = sentence.split(":")[0]
        assert option in cls.__init__.__code__.co_varnames, (cls, option)
