"""The modern KD heads (issue #14) against independent evaluations of the papers' formulas,
values and gradients, on small hand-made tensors; plus their edge cases (log of zero,
zero-variance rows, a class absent from the batch) and their trainable parts.

The references are written as the equations read (explicit loops over samples/classes,
``math``-style sums), not by calling the heads' helpers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.losses import (
    AB,
    CTKD,
    DIST,
    DKD,
    FSP,
    KDSVD,
    MLKD,
    OFD,
    VID,
    WTTM,
    CorrelationCongruence,
    CrossEntropy,
    FactorTransfer,
    KLDivergence,
    ModelOutput,
    ReviewKD,
    TeacherOutput,
)
from kd_lightning.losses.reviewkd import hcl
from kd_lightning.modules import DistillationModule
from kd_lightning.modules.teacher import TeacherSpec

N, C = 5, 4


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    z_s = torch.randn(N, C, generator=g) * 2
    z_t = torch.randn(N, C, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 1])
    return z_s, z_t, y


def _run(head, z_s, z_t, batch=None):
    """The head's loss and its gradient with respect to the student logits."""
    z = z_s.clone().requires_grad_()
    batch = batch if batch is not None else {"label": torch.zeros(len(z_s), dtype=torch.long)}
    loss = head(ModelOutput(z), TeacherOutput([ModelOutput(z_t)]), batch)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def _ref(fn, z_s, *args):
    z = z_s.clone().double().requires_grad_()
    loss = fn(z, *args)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach().float(), grad.float()


def _close(got, want, atol=1e-5):
    (l1, g1), (l2, g2) = got, want
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    torch.testing.assert_close(l1, l2, atol=atol, rtol=1e-4)
    torch.testing.assert_close(g1, g2, atol=atol, rtol=1e-4)


# -- hand-written references ------------------------------------------------------------
def softmax_rows(z, t=1.0):
    rows = []
    for row in z:
        e = [math.e ** 0 * torch.exp((v - row.max()) / t) for v in row]
        s = sum(e)
        rows.append(torch.stack([v / s for v in e]))
    return torch.stack(rows)


def zscore_rows(z):
    out = []
    for row in z:
        mean = sum(row) / len(row)
        var = sum((v - mean) ** 2 for v in row) / (len(row) - 1)
        std = var.sqrt() if var > 0 else var * 0
        out.append(torch.stack([(v - mean) / (std + 1e-7) for v in row]))
    return torch.stack(out)


def kl_rows(p, q):
    """Σ_c p log(p / q) per row, with 0·log 0 = 0."""
    return torch.stack([
        sum(pc * (pc.log() - qc.log()) if pc > 0 else pc * 0 for pc, qc in zip(pr, qr))
        for pr, qr in zip(p, q)
    ])


def ref_kd(z_s, z_t, t, ls=False):
    if ls:
        z_s, z_t = zscore_rows(z_s), zscore_rows(z_t.double())
    return kl_rows(softmax_rows(z_t.double(), t), softmax_rows(z_s, t)).mean() * t * t


def _norm(v):
    sq = (v * v).sum()
    return sq.sqrt() if sq > 0 else sq * 0  # a zero vector has norm 0 and no direction


def ref_pearson(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).sum() / (_norm(a) * _norm(b) + 1e-8)


def ref_dist(z_s, z_t, beta, gamma, t):
    ys, yt = softmax_rows(z_s, t), softmax_rows(z_t.double(), t)
    inter = 1 - sum(ref_pearson(ys[i], yt[i]) for i in range(len(ys))) / len(ys)
    intra = 1 - sum(ref_pearson(ys[:, c], yt[:, c]) for c in range(ys.shape[1])) / ys.shape[1]
    return t * t * (beta * inter + gamma * intra)


def ref_wttm(z_s, z_t, gamma, weighted=True):
    p_t = softmax_rows(z_t.double())
    total = 0
    for i in range(len(z_s)):
        powered = p_t[i] ** gamma
        u = powered.sum()
        q = powered / u
        kl = kl_rows(q[None], softmax_rows(z_s[i : i + 1]))[0]
        total = total + (u * kl if weighted else kl)
    return total / len(z_s)


# -- logit standardization (a switch on KD, DKD, MLKD) ----------------------------------
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_kd_with_logit_standardization(logits, t):
    z_s, z_t, _ = logits
    head = KLDivergence(temperature=t, logit_standardization=True)
    _close(_run(head, z_s, z_t), _ref(ref_kd, z_s, z_t, t, True))
    # invariant to a per-sample shift and scale of either network's logits
    shifted, _ = _run(head, z_s * 3 + 7, z_t * 0.5 - 2)
    torch.testing.assert_close(shifted, _run(head, z_s, z_t)[0], atol=1e-5, rtol=1e-5)
    # without the switch the head is plain KD
    _close(_run(KLDivergence(temperature=t), z_s, z_t), _ref(ref_kd, z_s, z_t, t))


def test_dkd_with_logit_standardization_equals_dkd_on_zscored_logits(logits):
    z_s, z_t, y = logits
    batch = {"label": y}
    ls = DKD(alpha=1.0, beta=8.0, temperature=2.0, logit_standardization=True)
    plain = DKD(alpha=1.0, beta=8.0, temperature=2.0)
    got = _run(ls, z_s, z_t, batch)
    z = z_s.clone().requires_grad_()
    want_loss = plain(ModelOutput(zscore_rows(z)), TeacherOutput([ModelOutput(zscore_rows(z_t))]), batch)
    (want_grad,) = torch.autograd.grad(want_loss, z)
    _close(got, (want_loss.detach(), want_grad))


def test_logit_standardization_zero_variance_row_is_finite(logits):
    z_s, z_t, _ = logits
    z_s, z_t = z_s.clone(), z_t.clone()
    z_s[1] = 3.0  # a constant student row: standardises to zeros (uniform softmax)
    z_t[2] = -1.0  # a constant teacher row
    loss, grad = _run(KLDivergence(temperature=2.0, logit_standardization=True), z_s, z_t)
    _close((loss, grad), _ref(ref_kd, z_s, z_t, 2.0, True))
    assert torch.isfinite(grad).all()


# -- DIST -------------------------------------------------------------------------------
def test_dist_matches_the_pearson_formula(logits):
    z_s, z_t, _ = logits
    _close(_run(DIST(beta=2.0, gamma=0.5, temperature=4.0), z_s, z_t),
           _ref(ref_dist, z_s, z_t, 2.0, 0.5, 4.0))
    # identical predictions are perfectly correlated: zero loss
    assert _run(DIST(), z_t, z_t)[0].abs() < 1e-6


def test_dist_zero_variance_row_is_finite(logits):
    z_s, z_t, _ = logits
    z_s, z_t = z_s.clone(), z_t.clone()
    z_s[0] = 0.5  # uniform student row: no correlation with anything
    z_t[3] = 2.0
    got = _run(DIST(beta=1.0, gamma=1.0, temperature=1.0), z_s, z_t)
    _close(got, _ref(ref_dist, z_s, z_t, 1.0, 1.0, 1.0))


# -- WTTM -------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [True, False])
def test_wttm_matches_the_power_transform_formula(logits, weighted):
    z_s, z_t, _ = logits
    _close(_run(WTTM(gamma=0.2, weighted=weighted), z_s, z_t),
           _ref(ref_wttm, z_s, z_t, 0.2, weighted))


def test_wttm_gamma_one_is_kd_at_t1(logits):
    z_s, z_t, _ = logits
    # γ = 1: p̃_t = p_t and U = 1, so WTTM is KL(p_t ‖ p_s)
    _close(_run(WTTM(gamma=1.0), z_s, z_t), _ref(ref_kd, z_s, z_t, 1.0))


def test_log_of_zero_teacher_probability_stays_finite(logits):
    """A teacher so confident that float32 softmax underflows to exact zeros."""
    z_s, _, _ = logits
    z_t = torch.tensor([[200.0, 0.0, -50.0, 0.0]] * N)
    assert (torch.softmax(z_t, 1) == 0).any()
    for head in (WTTM(gamma=0.1), KLDivergence(temperature=1.0), DIST(), MLKD(),
                 KLDivergence(temperature=1.0, logit_standardization=True)):
        loss, grad = _run(head, z_s, z_t)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), head


# -- CTKD -------------------------------------------------------------------------------
def test_ctkd_is_kd_at_its_learnt_temperature_with_reversed_gradient(logits):
    z_s, z_t, _ = logits
    head = CTKD(theta_init=0.3, lambda_epochs=4)
    t = 1.0 + 20.0 * (1 / (1 + math.exp(-0.3)))
    _close(_run(head, z_s, z_t), _ref(ref_kd, z_s, z_t, t), atol=1e-4)

    def theta_grad(epoch):
        head.zero_grad()
        head.current_weight(epoch, 0)  # the module's per-step call: sets the epoch
        head(ModelOutput(z_s), TeacherOutput([ModelOutput(z_t)]), {}).backward()
        return head.theta.grad.item()

    theta = torch.tensor(0.3, dtype=torch.double, requires_grad=True)
    ref = ref_kd(z_s.double(), z_t, 1.0 + 20.0 * torch.sigmoid(theta))
    (true_grad,) = torch.autograd.grad(ref, theta)
    # CTKD counts epochs from 1: Lightning's epoch 0 is its epoch 1, λ = (1 - cos(π/4))/2
    first = (1 - math.cos(math.pi / 4)) / 2
    assert theta_grad(0) == pytest.approx(-first * true_grad.item(), rel=1e-4)
    assert theta_grad(1) == pytest.approx(-0.5 * true_grad.item(), rel=1e-4)  # λ = ½ at E/2
    assert theta_grad(3) == pytest.approx(-true_grad.item(), rel=1e-4)  # λ = 1 from epoch E
    head.epoch_offset = 0  # the named departure: 0-based, no adversary in the first epoch
    assert theta_grad(0) == 0.0


def test_ctkd_temperature_is_in_the_optimizer_and_checkpoint():
    teacher = TeacherSpec(model="lenet5", model_kwargs={"width": 2}, allow_untrained=True)
    module = DistillationModule(student="mlp_tiny", teacher=teacher,
                                heads=[CrossEntropy(0.1), CTKD(0.9)])
    theta = module.heads[1].theta
    optim = module.configure_optimizers()
    assert any(p is theta for group in optim.param_groups for p in group["params"])
    assert "heads.1.theta" in module.state_dict()
    # and a step past the curriculum's start gives it a gradient
    module.heads[1].current_weight(20, 0)
    batch = {"image": torch.randn(6, 1, 28, 28), "label": torch.arange(6), "index": torch.arange(6)}
    module.heads[1](module._student_taps(batch["image"]), module.teacher_forward(batch), batch).backward()
    assert theta.grad is not None and theta.grad.abs() > 0


# -- MLKD -------------------------------------------------------------------------------
def ref_mlkd(z_s, z_t, temps, strong=None, ls=False):
    weak = [i for i in range(len(z_s)) if strong is None or not strong[i]]
    zs_w, zt_w = z_s[weak], z_t[weak].double()
    p1 = softmax_rows(zt_w)
    conf = [max(row) for row in p1]
    med = torch.stack(conf).median()  # odd count: the middle value
    m = sum(1.0 for c in conf if c <= med) / len(conf)
    cls = [sum(p1[:, c]) for c in range(p1.shape[1])]
    cls_sorted = sorted(float(v) for v in cls)
    k = len(cls_sorted)
    cmed = (cls_sorted[k // 2 - 1] + cls_sorted[k // 2]) / 2 if k % 2 == 0 else cls_sorted[k // 2]
    c_frac = sum(1.0 for v in cls if v <= cmed) / k
    total = 0
    for t in temps:
        ps, pt = softmax_rows(zs_w, t), softmax_rows(zt_w, t)
        n, cc = ps.shape
        bc = sum((sum(pt[i] * pt[j]) - sum(ps[i] * ps[j])) ** 2 for i in range(n) for j in range(n)) / n
        cl = sum((sum(pt[:, a] * pt[:, b]) - sum(ps[:, a] * ps[:, b])) ** 2
                 for a in range(cc) for b in range(cc)) / cc
        total = total + m * ref_kd(zs_w, zt_w, t, ls) + c_frac * cl + m * bc
    if strong is not None and any(strong):
        idx = [i for i in range(len(z_s)) if strong[i]]
        for t in temps:
            total = total + ref_kd(z_s[idx], z_t[idx].double(), t, ls)
    return total


@pytest.mark.parametrize("ls", [False, True])
def test_mlkd_matches_the_multi_level_formula(logits, ls):
    z_s, z_t, _ = logits
    temps = [4.0, 2.0]
    _close(_run(MLKD(temperatures=temps, logit_standardization=ls), z_s, z_t),
           _ref(ref_mlkd, z_s, z_t, temps, None, ls))


def test_mlkd_uses_the_strong_view_rows(logits):
    z_s, z_t, _ = logits
    z_s2, z_t2 = torch.cat([z_s, z_s.flip(0) * 0.5]), torch.cat([z_t, z_t.flip(1)])
    strong = torch.tensor([False] * N + [True] * N)
    got = _run(MLKD(temperatures=[3.0]), z_s2, z_t2, {"strong_view": strong})
    _close(got, _ref(ref_mlkd, z_s2, z_t2, [3.0], strong.tolist()))
    only_weak = _run(MLKD(temperatures=[3.0]), z_s, z_t)[0]
    assert got[0] > only_weak  # the strong rows add their KD terms


def test_mlkd_class_absent_from_the_batch(logits):
    """Every teacher prediction in one class: the other classes are empty in this batch."""
    z_s, _, _ = logits
    z_t = torch.tensor([[9.0, -3.0, -3.0, -3.0]] * N) + torch.linspace(0, 1, N)[:, None]
    got = _run(MLKD(temperatures=[4.0, 1.0]), z_s, z_t)
    _close(got, _ref(ref_mlkd, z_s, z_t, [4.0, 1.0]))


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: DIST(beta=-1.0), "DIST.beta"),
        (lambda: DIST(temperature=0.0), "DIST.temperature"),
        (lambda: WTTM(gamma=0.0), "WTTM.gamma"),
        (lambda: CTKD(t_range=0.0), "CTKD.t_range"),
        (lambda: CTKD(lambda_epochs=0), "CTKD.lambda_epochs"),
        (lambda: MLKD(temperatures=[]), "MLKD.temperatures"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


# -- feature heads ----------------------------------------------------------------------

def _built(head, s_feats, t_feats):
    head.build({k: v.shape for k, v in s_feats.items()}, {k: v.shape for k, v in t_feats.items()})
    return head


def _feat_run(head, s_feats, t_feats):
    """The head's loss on features, and the gradient with respect to the first student map."""
    s = {k: v.clone().requires_grad_() for k, v in s_feats.items()}
    first = next(iter(s.values()))
    loss = head(ModelOutput(torch.zeros(len(first), 3), s),
                TeacherOutput([ModelOutput(torch.zeros(len(first), 3), t_feats)]), {})
    (grad,) = torch.autograd.grad(loss, first, allow_unused=True)
    return loss.detach(), grad


def _maps(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def test_vid_is_the_gaussian_negative_log_likelihood():
    f_s, f_t = _maps(1, (3, 2, 4, 4), (3, 5, 4, 4))
    head = _built(VID(student_layers="a", teacher_layers="b", init_var=2.0), {"a": f_s}, {"b": f_t})
    loss, _ = _feat_run(head, {"a": f_s}, {"b": f_t})
    reg = head.regressors[0]
    mu = reg.mean(f_s).detach()
    var = math.log1p(math.exp(reg.log_scale[0].item())) + 1e-5
    assert var == pytest.approx(2.0, rel=1e-4)  # the variance starts at init_var
    terms = [0.5 * ((mu[n, c, h, w] - f_t[n, c, h, w]) ** 2 / var + math.log(var))
             for n in range(3) for c in range(5) for h in range(4) for w in range(4)]
    assert loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)
    assert "0.log_scale" in dict(head.regressors.named_parameters())


def test_ab_matches_the_boundary_hinge():
    s1, t1, s2, t2 = _maps(2, (2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 2, 2), (2, 3, 2, 2))
    head = _built(AB(student_layers=["a", "c"], teacher_layers=["b", "d"], margin=0.5),
                  {"a": s1, "c": s2}, {"b": t1, "d": t2})
    # equal shapes: no connector (as RepDistiller and the AB authors), the hinge on the raw maps
    assert all(isinstance(conn, torch.nn.Identity) for conn in head.connectors)
    loss, grad = _feat_run(head, {"a": s1, "c": s2}, {"b": t1, "d": t2})
    # d/ds of the hinge, by hand: 2(s+m) where pushed down, 2(s-m) where pushed up
    g = 2 * (s1 + 0.5) * ((t1 <= 0) & (s1 > -0.5)) + 2 * (s1 - 0.5) * ((t1 > 0) & (s1 <= 0.5))
    torch.testing.assert_close(grad, g * 2.0 ** -1 / 2 / 1000 * 3)
    want = 0.0
    for i, (s, t) in enumerate([(s1, t1), (s2, t2)]):
        part = 0.0
        for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist()):
            if tv <= 0 and sv > -0.5:
                part += (sv + 0.5) ** 2
            if tv > 0 and sv <= 0.5:
                part += (sv - 0.5) ** 2
        want += 2.0 ** (i - 1) * part / 2
    assert loss.item() == pytest.approx(want / 1000 * 3, rel=1e-4)


def test_fsp_matches_the_flow_matrices():
    s0, s1, t0, t1 = _maps(3, (2, 3, 4, 4), (2, 3, 2, 2), (2, 3, 4, 4), (2, 3, 2, 2))
    head = _built(FSP(student_layers=["a", "b"], teacher_layers=["a", "b"]),
                  {"a": s0, "b": s1}, {"a": t0, "b": t1})
    got = _feat_run(head, {"a": s0, "b": s1}, {"a": t0, "b": t1})

    def gram(bottom, top):
        bottom = torch.nn.functional.avg_pool2d(bottom, 2)  # 4×4 → 2×2
        return torch.stack([torch.stack([torch.stack([
            (top[n, a] * bottom[n, b]).mean() for b in range(3)]) for a in range(3)]) for n in range(2)])

    _close(got, _ref(lambda s: (gram(s, s1) - gram(t0, t1)).pow(2).mean(), s0))


def test_fsp_and_kdsvd_need_equal_widths():
    s, t = torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4)
    for head in (FSP(student_layers=["a", "a"], teacher_layers=["b", "b"]),
                 KDSVD(student_layers=["a", "a"], teacher_layers=["b", "b"])):
        with pytest.raises(ConfigError, match="student_layers"):
            _built(head, {"a": s}, {"b": t})


def test_cc_matches_the_neighbour_correlation():
    f_s, f_t = _maps(4, (4, 6), (4, 8))
    head = _built(CorrelationCongruence(student_layers="a", teacher_layers="b", feat_dim=3),
                  {"a": f_s}, {"b": f_t})
    loss, _ = _feat_run(head, {"a": f_s}, {"b": f_t})
    # RepDistiller's LinearEmbed: no L2 normalisation (normalize=True is the option)
    d = (head.embed_s(f_s).detach() - head.embed_t(f_t).detach()).abs()
    want = sum(float((d[i] * d[i + 1]).sum()) for i in range(3)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # one sample has no neighbour: zero, with a graph
    one, grad = _feat_run(head, {"a": f_s[:1]}, {"b": f_t[:1]})
    assert one.item() == 0.0 and torch.isfinite(grad).all()


def test_ofd_partial_l2_with_the_running_margin():
    f_s, f_t = _maps(5, (2, 3, 2, 2), (2, 3, 2, 2))
    head = _built(OFD(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    head.connectors[0].proj[0].weight.data = torch.eye(3)[:, :, None, None]
    head.connectors[0].proj.eval()
    head.connectors[0].proj[1].running_var.fill_(1 - 1e-5)
    assert head.margin(0).abs().sum() == 0  # no negatives seen yet
    loss, grad = _feat_run(head, {"a": f_s}, {"b": f_t})
    margin = [float(f_t[:, c][f_t[:, c] < 0].mean()) for c in range(3)]  # E[t | t < 0]
    m = torch.tensor(margin).view(1, 3, 1, 1)
    g = (2 * (f_s - m) * ((f_s > m) & (f_t <= m)) + 2 * (f_s - f_t) * ((f_s > f_t) & (f_t > m) & (f_t <= 0))
         + 2 * (f_s - f_t) * (f_t > 0)) / 2
    torch.testing.assert_close(grad, g)
    torch.testing.assert_close(head.margin(0), torch.tensor(margin))
    want = 0.0
    for n in range(2):
        for c in range(3):
            m = margin[c]
            for s, t in zip(f_s[n, c].flatten().tolist(), f_t[n, c].flatten().tolist()):
                if s > m and t <= m:
                    want += (s - m) ** 2
                elif t > m and t <= 0 and s > t:
                    want += (s - t) ** 2
                elif t > 0:
                    want += (s - t) ** 2
    assert loss.item() == pytest.approx(want / 2, rel=1e-4)
    assert "neg_sum_0" in head.state_dict()


def test_reviewkd_hcl_and_fusion_order():
    a, b = _maps(6, (2, 3, 8, 8), (2, 3, 8, 8))
    pooled = [(1.0, a, b)] + [(w, torch.nn.functional.adaptive_avg_pool2d(a, k),
                               torch.nn.functional.adaptive_avg_pool2d(b, k))
                              for w, k in ((0.5, 4), (0.25, 2), (0.125, 1))]
    want = sum(w * ((x - y) ** 2).mean() for w, x, y in pooled) / sum(w for w, _, _ in pooled)
    torch.testing.assert_close(hcl(a, b), want)
    s1, s2, e_s, t1, t2, e_t = _maps(7, (2, 3, 8, 8), (2, 5, 4, 4), (2, 6), (2, 4, 8, 8),
                                     (2, 6, 4, 4), (2, 7))
    s = {"l1": s1, "l2": s2, "e": e_s}
    t = {"m1": t1, "m2": t2, "f": e_t}
    head = _built(ReviewKD(student_layers=["l1", "l2", "e"], teacher_layers=["m1", "m2", "f"]), s, t)
    assert [abf.att is None for abf in head.abfs] == [False, False, True]  # deepest: no fusion
    loss, grad = _feat_run(head, s, t)
    # the same chain by hand: deepest first, each residual handed one stage up
    y3, r = head.abfs[2](e_s[:, :, None, None], None, (1, 1))
    y2, r = head.abfs[1](s2, r, (4, 4))
    y1, _ = head.abfs[0](s1, r, (8, 8))
    want = hcl(y3, e_t[:, :, None, None]) + hcl(y2, t2) + hcl(y1, t1)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert grad is not None and torch.isfinite(grad).all()


def test_kdsvd_is_invariant_to_channel_sign_flips_of_the_teacher():
    s1, s2, t1, t2 = _maps(8, (2, 4, 3, 3), (2, 4, 3, 3), (2, 4, 3, 3), (2, 4, 3, 3))
    head = _built(KDSVD(student_layers=["a", "b"], teacher_layers=["c", "d"]),
                  {"a": s1, "b": s2}, {"c": t1, "d": t2})
    loss, grad = _feat_run(head, {"a": s1, "b": s2}, {"c": t1, "d": t2})
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(grad).all()
    # singular vectors are defined up to sign: the loss must not depend on it
    flipped, _ = _feat_run(head, {"a": s1, "b": s2}, {"c": -t1, "d": -t2})
    assert flipped.item() == pytest.approx(loss.item(), rel=1e-4)
    # a student equal to the teacher has nothing left to learn
    same, _ = _feat_run(head, {"a": t1, "b": t2}, {"c": t1, "d": t2})
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_factor_transfer_warms_up_its_paraphraser_then_freezes_it():
    f_s, f_t = _maps(9, (2, 3, 4, 4), (2, 6, 4, 4))
    head = _built(FactorTransfer(student_layers="a", teacher_layers="b", paraphraser_epochs=2),
                  {"a": f_s}, {"b": f_t})
    head.current_weight(0, 0)  # warm-up: reconstruction / weight, no gradient to the student
    loss, grad = _feat_run(head, {"a": f_s}, {"b": f_t})
    rec = head.paraphraser.decoder(head.paraphraser.encoder(f_t))
    assert loss.item() == pytest.approx(((rec - f_t) ** 2).mean().item() / 200.0, rel=1e-5)
    assert grad is None
    head.current_weight(2, 0)  # afterwards: the factor loss, paraphraser frozen
    loss, grad = _feat_run(head, {"a": f_s}, {"b": f_t})
    fs = head.translator(f_s).detach().pow(2).mean(1).flatten(1)
    ft = head.paraphraser.encoder(f_t).detach().pow(2).mean(1).flatten(1)
    fs, ft = fs / fs.norm(dim=1, keepdim=True), ft / ft.norm(dim=1, keepdim=True)
    assert loss.item() == pytest.approx((fs - ft).abs().mean().item(), rel=1e-5)
    assert grad is not None
    head.zero_grad()
    head(ModelOutput(torch.zeros(2, 3), {"a": f_s}),
         TeacherOutput([ModelOutput(torch.zeros(2, 3), {"b": f_t})]), {}).backward()
    assert all(p.grad is None for p in head.paraphraser.parameters())


# -- pre-activation taps (FeatureTaps ":input") -----------------------------------------
@pytest.mark.parametrize("arch", ["cifar", "torchvision"])
def test_input_taps_give_pre_relu_block_outputs(arch):
    from kd_lightning.modules.features import FeatureTaps

    if arch == "cifar":
        from kd_lightning.models.cifar_resnet import CifarResNet

        model, tap, out, x = CifarResNet(8, (32, 64, 128, 256)), "layer3.0.relu:input", "layer3", (2, 3, 32, 32)
    else:
        from torchvision.models import resnet18

        model, tap, out, x = resnet18(num_classes=5), "layer4.1.relu:input", "layer4", (2, 3, 64, 64)
    model.eval()
    taps = FeatureTaps(model, [tap, out], "student_layers")
    feats = taps(torch.randn(*x)).features
    pre, post = feats[tap], feats[out]
    assert (pre < 0).any()  # captured before the in-place ReLU overwrote it
    torch.testing.assert_close(pre.relu(), post)  # the block output is relu(pre-activation)
    with pytest.raises(ConfigError, match=r"Closest: .*relu.*:input"):
        FeatureTaps(model, [tap.replace("relu", "rellu")], "teacher_layers")


# -- the reproduction configs of these methods parse alone --------------------------------
REPRO_PAIR = Path(__file__).resolve().parents[1] / "configs/repro/cifar100/resnet32x4_resnet8x4"
MODERN = ["kd_ls", "dkd_ls", "mlkd", "mlkd_ls", "ctkd", "dist", "wttm", "kd_dot", "reviewkd", "ofd",
          "vid", "kdsvd", "ab", "fsp", "ft", "cc"]


@pytest.mark.parametrize("name", MODERN)
def test_repro_config_parses_alone_and_cites_its_target(name):
    import contextlib
    import io

    import yaml

    from kd_lightning.cli import main

    path = REPRO_PAIR / f"{name}.yaml"
    assert "# target: " in path.read_text()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["init_args"]["student"] == "resnet8x4"
