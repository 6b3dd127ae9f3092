"""Every loss head against a reference formula written independently here, on fixed
seeded tensors; construction-time errors; gradients reach only the student + adapters.

The references follow the published code (RepDistiller, mdistiller) or the papers'
equations, written in a deliberately different style (loops, ``torch.cdist``, explicit
BatchNorm) from the heads, so a shared mistake is unlikely.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses import (
    CRD,
    DKD,
    NST,
    PKT,
    RKD,
    AttentionTransfer,
    CrossEntropy,
    FitNet,
    KLDivergence,
    LinearWarmup,
    LogitMSE,
    ModelOutput,
    PseudoLabel,
    SimilarityPreserving,
    TeacherOutput,
)
from kd_lightning.modules import DistillationModule
from kd_lightning.modules.teacher import TeacherSpec

N, C = 6, 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def logits():
    g = _gen()
    z_s = torch.randn(N, C, generator=g) * 3
    z_t = torch.randn(N, C, generator=g) * 3
    y = torch.randint(0, C, (N,), generator=g)
    return z_s, z_t, y


def _outs(z_s, z_t, s_feats=None, t_feats=None):
    return ModelOutput(z_s, s_feats or {}), TeacherOutput([ModelOutput(z_t, t_feats or {})])


def _batch(y, index=None):
    return {"label": y, "index": torch.arange(len(y)) if index is None else index}


def _huber(a, b):
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


# -- logit heads ------------------------------------------------------------------------
def test_kd_is_t_squared_kl(logits):
    z_s, z_t, y = logits
    t = 4.0
    ref = 0.0
    for i in range(N):
        p_t = torch.softmax(z_t[i] / t, 0)
        ref += (p_t * (p_t.log() - torch.log_softmax(z_s[i] / t, 0))).sum()
    ref = ref / N * t * t
    s, te = _outs(z_s, z_t)
    assert torch.allclose(KLDivergence(temperature=t)(s, te, _batch(y)), ref, atol=1e-5)


def test_ce_label_smoothing_ignores_unlabelled(logits):
    z_s, _, y = logits
    y = y.clone()
    y[[1, 4]] = -1
    eps = 0.1
    losses = []
    for i in range(N):
        if y[i] < 0:
            continue
        q = torch.full((C,), eps / C)
        q[y[i]] += 1 - eps
        losses.append(-(q * torch.log_softmax(z_s[i], 0)).sum())
    ref = torch.stack(losses).mean()
    s, te = _outs(z_s, z_s)
    assert torch.allclose(CrossEntropy(label_smoothing=eps)(s, te, _batch(y)), ref, atol=1e-6)


def test_logit_mse(logits):
    z_s, z_t, y = logits
    ref = sum(((z_s[i, c] - z_t[i, c]) ** 2) for i in range(N) for c in range(C)) / (N * C)
    assert torch.allclose(LogitMSE()(*_outs(z_s, z_t), _batch(y)), ref, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_pseudo_label(logits, threshold):
    z_s, z_t, y = logits
    total = 0.0
    for i in range(N):
        p_t = torch.softmax(z_t[i], 0)
        if p_t.max() >= threshold:
            total += -torch.log_softmax(z_s[i], 0)[p_t.argmax()]
    ref = torch.as_tensor(total) / N  # FixMatch: divided by the batch size
    got = PseudoLabel(threshold=threshold)(*_outs(z_s, z_t), _batch(torch.full((N,), -1)))
    assert torch.allclose(got, ref, atol=1e-5)
    if threshold:  # the fixed tensors do have both confident and unsure teacher rows
        conf = torch.softmax(z_t, 1).max(1).values
        assert (conf >= threshold).any() and (conf < threshold).any()


def _mdistiller_dkd(z_s, z_t, y, alpha, beta, t):
    """mdistiller's ``dkd_loss``, literally: masks, the -1000 trick, KL sums over the batch."""
    gt = torch.zeros_like(z_s).scatter_(1, y[:, None], 1).bool()
    other = ~gt
    p_s, p_t = F.softmax(z_s / t, 1), F.softmax(z_t / t, 1)

    def cat_mask(p):
        return torch.stack([(p * gt).sum(1), (p * other).sum(1)], 1)

    tckd = F.kl_div(torch.log(cat_mask(p_s)), cat_mask(p_t), reduction="sum") * t**2 / len(y)
    p_t2 = F.softmax(z_t / t - 1000.0 * gt, 1)
    log_p_s2 = F.log_softmax(z_s / t - 1000.0 * gt, 1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * t**2 / len(y)
    return alpha * tckd + beta * nckd


def test_dkd_matches_mdistiller(logits):
    z_s, z_t, y = logits
    ref = _mdistiller_dkd(z_s, z_t, y, 1.0, 8.0, 4.0)
    got = DKD(alpha=1.0, beta=8.0, temperature=4.0)(*_outs(z_s, z_t), _batch(y))
    assert torch.allclose(got, ref, atol=1e-5)


def test_dkd_decomposes_kd(logits):
    """Zhao et al. Eq. 1: KD = TCKD + (1 - p_t[target])·NCKD, per sample."""
    z_s, z_t, y = logits
    for i in range(N):
        s, te = _outs(z_s[i : i + 1], z_t[i : i + 1])
        b = _batch(y[i : i + 1])
        p_gt = torch.softmax(z_t[i] / 2.0, 0)[y[i]].item()
        dkd = DKD(alpha=1.0, beta=1.0 - p_gt, temperature=2.0)(s, te, b)
        assert torch.allclose(dkd, KLDivergence(temperature=2.0)(s, te, b), atol=1e-5)


def test_dkd_unlabelled_samples(logits):
    z_s, z_t, y = logits
    y_partial = y.clone()
    y_partial[[0, 3]] = -1
    keep = y_partial >= 0
    got = DKD()(*_outs(z_s, z_t), _batch(y_partial))
    ref = _mdistiller_dkd(z_s[keep], z_t[keep], y[keep], 1.0, 8.0, 4.0)
    assert torch.allclose(got, ref, atol=1e-5)

    # unlabelled_nckd: NCKD also runs on unlabelled rows, around the teacher's argmax
    pseudo = torch.where(keep, y, z_t.argmax(1))
    tckd = _mdistiller_dkd(z_s[keep], z_t[keep], y[keep], 1.0, 0.0, 4.0)
    nckd = _mdistiller_dkd(z_s, z_t, pseudo, 0.0, 8.0, 4.0)
    got = DKD(unlabelled_nckd=True)(*_outs(z_s, z_t), _batch(y_partial))
    assert torch.allclose(got, tckd + nckd, atol=1e-5)

    # a batch without any label: finite, zero, and still differentiable
    z = z_s.clone().requires_grad_(True)
    loss = DKD()(*_outs(z, z_t), _batch(torch.full((N,), -1)))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


# -- feature heads ----------------------------------------------------------------------
def _maps(*shapes, seed=0):
    g = _gen(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def _built(head, s_feats: dict, t_feats: dict):
    head.build({k: v.shape for k, v in s_feats.items()}, {k: v.shape for k, v in t_feats.items()})
    return head


def _run(head, s_feats, t_feats, y=None):
    z = torch.zeros(next(iter(s_feats.values())).shape[0], C)
    y = torch.zeros(len(z), dtype=torch.long) if y is None else y
    return head(*_outs(z, z, s_feats, t_feats), _batch(y))


def _bn_train(x, bn):
    dims = [0, 2, 3] if x.ndim == 4 else [0]
    shape = [1, -1, 1, 1] if x.ndim == 4 else [1, -1]
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def test_fitnet_conv_connector_with_pooling():
    f_s, f_t = _maps((N, 3, 8, 8), (N, 4, 4, 4))
    # resize="interpolate": pool, then 1×1 (the default "conv" is RepDistiller's ConvReg,
    # a strided conv here; tests/parity/test_parity_feature_maps.py covers it)
    head = _built(FitNet(student_layers="a", teacher_layers="b", resize="interpolate"),
                  {"a": f_s}, {"b": f_t})
    conv, bn = head.connectors[0].proj
    assert conv.weight.shape == (4, 3, 1, 1)
    pooled = f_s.view(N, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2×2 blocks by hand
    regressed = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], pooled)
    ref = ((torch.relu(_bn_train(regressed, bn)) - f_t) ** 2).mean()
    assert torch.allclose(_run(head, {"a": f_s}, {"b": f_t}), ref, atol=1e-5)


def test_fitnet_linear_and_upsampling_connectors():
    f_s, f_t = _maps((N, 7), (N, 3))
    head = _built(FitNet(student_layers="a", teacher_layers="b", relu=False), {"a": f_s}, {"b": f_t})
    lin = head.connectors[0].proj
    ref = ((f_s @ lin.weight.t() + lin.bias - f_t) ** 2).mean()
    assert torch.allclose(_run(head, {"a": f_s}, {"b": f_t}), ref, atol=1e-5)

    # several pairs sum; a smaller student map is upsampled; a conv map may hint a flat layer
    small, big, flat_s, flat_t = _maps((N, 2, 4, 4), (N, 3, 8, 8), (N, 4, 2, 2), (N, 5))
    s, t = {"a": small, "c": flat_s}, {"b": big, "d": flat_t}
    head = _built(FitNet(student_layers=["a", "c"], teacher_layers=["b", "d"]), s, t)
    assert head.connectors[0](small).shape == big.shape
    assert head.connectors[1](flat_s).shape == flat_t.shape
    parts = [F.mse_loss(m(s[k]), t[j]) for m, k, j in zip(head.connectors, "ac", "bd")]
    assert torch.allclose(_run(head, s, t), parts[0] + parts[1], atol=1e-6)


def test_attention_transfer():
    f_s, f_t = _maps((N, 3, 4, 4), (N, 5, 8, 8))  # teacher map is larger: pooled to 4×4
    pooled_t = f_t.view(N, 5, 4, 2, 4, 2).mean(dim=(3, 5))
    diffs = []
    for i in range(N):
        a_s = (f_s[i] ** 2).mean(0).flatten()
        a_t = (pooled_t[i] ** 2).mean(0).flatten()
        diffs.append((a_s / a_s.norm() - a_t / a_t.norm()) ** 2)
    ref = torch.stack(diffs).mean()
    head = _built(AttentionTransfer(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    assert torch.allclose(_run(head, {"a": f_s}, {"b": f_t}), ref, atol=1e-6)


def test_similarity_preserving():
    f_s, f_t = _maps((N, 3, 2, 2), (N, 10))
    def gram(f):
        flat = f.reshape(N, -1)
        g = torch.stack([torch.stack([flat[i] @ flat[j] for j in range(N)]) for i in range(N)])
        return g / g.norm(dim=1, keepdim=True)

    ref = ((gram(f_s) - gram(f_t)) ** 2).sum() / N**2
    head = SimilarityPreserving(student_layers="a", teacher_layers="b")
    assert torch.allclose(_run(_built(head, {"a": f_s}, {"b": f_t}), {"a": f_s}, {"b": f_t}), ref, atol=1e-6)


def _rkd_reference(e_s, e_t, w_d, w_a):
    def dist(e):
        d = torch.cdist(e, e)
        return d / d[~torch.eye(len(e), dtype=torch.bool)].mean()

    def angle(e):
        n = len(e)
        out = torch.zeros(n, n, n)
        for j in range(n):  # vertex
            for i in range(n):
                for k in range(n):
                    u, v = e[i] - e[j], e[k] - e[j]
                    if u.norm() > 0 and v.norm() > 0:
                        out[j, i, k] = u @ v / (u.norm() * v.norm())
        return out

    return w_d * _huber(dist(e_s), dist(e_t)) + w_a * _huber(angle(e_s), angle(e_t))


def test_rkd():
    f_s, f_t = _maps((N, 4), (N, 2, 3))
    ref = _rkd_reference(f_s, f_t.reshape(N, -1), 25.0, 50.0)
    head = _built(RKD(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    assert torch.allclose(_run(head, {"a": f_s}, {"b": f_t}), ref, atol=1e-5)
    only_angle = _built(RKD(student_layers="a", teacher_layers="b", distance_weight=0), {"a": f_s}, {"b": f_t})
    assert torch.allclose(
        _run(only_angle, {"a": f_s}, {"b": f_t}), _rkd_reference(f_s, f_t.reshape(N, -1), 0, 50.0), atol=1e-5
    )
    # a batch of one sample has no relations: zero, not NaN
    one = _run(head, {"a": f_s[:1]}, {"b": f_t[:1]})
    assert torch.isfinite(one) and one.item() == 0.0


def test_pkt():
    f_s, f_t = _maps((N, 4), (N, 9))
    eps = 1e-7

    def cond(f):
        k = torch.zeros(N, N)
        for i in range(N):
            for j in range(N):
                k[i, j] = (F.cosine_similarity(f[i], f[j], dim=0) + 1) / 2
        return k / k.sum(1, keepdim=True)

    p_s, p_t = cond(f_s), cond(f_t)
    ref = (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
    head = _built(PKT(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    assert torch.allclose(_run(head, {"a": f_s}, {"b": f_t}), ref, atol=1e-6)


def test_nst():
    f_s, f_t = _maps((N, 3, 4, 4), (N, 5, 4, 4))
    terms = []
    for i in range(N):
        s = F.normalize(f_s[i].reshape(3, -1), dim=1)
        t = F.normalize(f_t[i].reshape(5, -1), dim=1)
        terms.append(((t @ t.T) ** 2, (s @ s.T) ** 2, (s @ t.T) ** 2))
    ref = sum(
        torch.stack([x[k] for x in terms]).mean() * sign for k, sign in ((0, 1), (1, 1), (2, -2))
    )
    head = _built(NST(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    assert torch.allclose(_run(head, {"a": f_s}, {"b": f_t}), ref, atol=1e-6)


def _crd(num_samples=20, nce_k=7, momentum=0.5, s_dim=6, t_dim=4):
    head = CRD(student_layers="a", teacher_layers="b", num_samples=num_samples, feat_dim=8,
               nce_k=nce_k, momentum=momentum)
    return _built(head, {"a": torch.zeros(2, s_dim)}, {"b": torch.zeros(2, t_dim)})


@pytest.mark.parametrize(("bank", "k"), [(20, 7), (200, 3)], ids=["gemm", "gather"])
def test_crd_contrast_matches_nce_formula(bank, k):
    """Both scoring paths (one GEMM over the bank, or gathered rows) give Eq. 18."""
    torch.manual_seed(0)
    head = _crd(num_samples=bank, nce_k=k)
    v_s, v_t = (F.normalize(v, dim=1) for v in _maps((N, 8), (N, 8)))
    index = torch.tensor([3, 0, 7, 19, 12, 5])
    negatives = torch.randint(0, bank, (N, k), generator=_gen(1))
    got = head.contrast(v_s, v_t, index, negatives)

    pn, eps, tau = 1 / bank, 1e-7, 0.07

    def nce(anchor, memory):
        scores = torch.zeros(N, k + 1)
        for i in range(N):
            rows = [int(index[i])] + negatives[i].tolist()
            scores[i] = torch.stack([torch.exp(memory[r] @ anchor[i] / tau) for r in rows])
        scores = scores / (scores.mean() * bank)  # Z from this (first) batch
        pos = torch.log(scores[:, 0] / (scores[:, 0] + k * pn + eps)).sum()
        neg = torch.log(k * pn / (scores[:, 1:] + k * pn + eps)).sum()
        return -(pos + neg) / N

    ref = nce(v_s, head.memory_t) + nce(v_t, head.memory_s)
    assert torch.allclose(got, ref, rtol=1e-5)


def test_crd_memory_update_growth_and_reload():
    torch.manual_seed(0)
    f_s, f_t = _maps((N, 6), (N, 4))
    index = torch.tensor([3, 0, 7, 19, 12, 5])
    head = _crd(momentum=0.5)
    before_s, before_t = head.memory_s.clone(), head.memory_t.clone()
    z = torch.zeros(N, C)
    head(*_outs(z, z, {"a": f_s}, {"b": f_t}), _batch(torch.zeros(N, dtype=torch.long), index))
    with torch.no_grad():
        v_s = F.normalize(head.embed_s(f_s), dim=1)
        v_t = F.normalize(head.embed_t(f_t), dim=1)
    for bank, old, v in ((head.memory_s, before_s, v_s), (head.memory_t, before_t, v_t)):
        expected = 0.5 * old[index] + 0.5 * v
        assert torch.allclose(bank[index], expected / expected.norm(dim=1, keepdim=True), atol=1e-6)
        untouched = torch.ones(20, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(bank[untouched], old[untouched])

    # eval mode never writes the bank
    head.eval()
    frozen = head.memory_s.clone()
    head(*_outs(z, z, {"a": f_s}, {"b": f_t}), _batch(torch.zeros(N, dtype=torch.long), index))
    assert torch.equal(head.memory_s, frozen)

    # an index beyond num_samples is a config error naming the field
    with pytest.raises(ConfigError, match="CRD.num_samples"):
        head(*_outs(z, z, {"a": f_s}, {"b": f_t}), _batch(torch.zeros(N, dtype=torch.long), index + 20))

    # a lazily sized bank grows to the largest index, and a fresh head adopts it on load
    lazy = _crd(num_samples=None)
    assert lazy.bank_size == 0
    lazy(*_outs(z, z, {"a": f_s}, {"b": f_t}), _batch(torch.zeros(N, dtype=torch.long), index))
    assert lazy.bank_size == 20 and lazy.z[0] > 0
    fresh = _crd(num_samples=None)
    fresh.load_state_dict(lazy.state_dict())
    assert torch.equal(fresh.memory_t, lazy.memory_t) and torch.equal(fresh.z, lazy.z)


# -- construction-time errors -----------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: KLDivergence(temperature=0.0), "KLDivergence.temperature"),
        (lambda: DKD(temperature=-1.0), "DKD.temperature"),
        (lambda: DKD(beta=-1.0), "DKD.beta"),
        (lambda: CrossEntropy(weight=-0.5), "CrossEntropy.weight"),
        (lambda: FitNet(weight=-1, student_layers="a", teacher_layers="a"), "FitNet.weight"),
        (lambda: FitNet(), "FitNet.student_layers"),
        (lambda: AttentionTransfer(student_layers=["layer1"]), "AttentionTransfer.teacher_layers"),
        (lambda: NST(student_layers=[], teacher_layers=[]), "NST.student_layers"),
        (lambda: SimilarityPreserving(student_layers=["a", "b"], teacher_layers="a"),
         "SimilarityPreserving.teacher_layers"),
        (lambda: CRD(student_layers=["a", "b"], teacher_layers=["a", "b"]), "CRD.student_layers"),
        (lambda: CRD(student_layers="a", teacher_layers="a", nce_t=0), "CRD.nce_t"),
        (lambda: PseudoLabel(threshold=1.0), "PseudoLabel.threshold"),
        (lambda: PKT(student_layers="a", teacher_layers="a", eps=0), "PKT.eps"),
        (lambda: RKD(student_layers="a", teacher_layers="a", distance_weight=0, angle_weight=0),
         "RKD.angle_weight"),
        (lambda: LinearWarmup(epochs=0), "LinearWarmup.epochs"),
    ],
)
def test_bad_head_arguments(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field
    assert field in str(info.value)


def _module(heads, student="lenet5", **kwargs) -> DistillationModule:
    teacher = TeacherSpec(model="lenet5", model_kwargs={"width": 2}, allow_untrained=True)
    return DistillationModule(student=student, teacher=teacher, heads=heads, **kwargs)


def test_all_weights_zero_is_an_error():
    with pytest.raises(ConfigError, match="model.heads"):
        _module([CrossEntropy(0.0), KLDivergence(0.0)])


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_unknown_layer_names_model_bad_name_and_closest(side):
    layers = {"student_layers": "layer1", "teacher_layers": "layer1", f"{side}_layers": "layr2"}
    with pytest.raises(ConfigError) as info:
        _module([AttentionTransfer(**layers)], student="lenet5")
    msg = str(info.value)
    assert info.value.field.endswith(f"{side}_layers")
    assert "'lenet5'" in msg and "'layr2'" in msg and "layer2" in msg.split("Closest:")[1]


def test_feature_shape_errors_at_construction():
    with pytest.raises(ConfigError, match="AttentionTransfer.student_layers") as info:
        _module([AttentionTransfer(student_layers="features", teacher_layers="layer2")])
    assert "(2, 84)" in str(info.value)  # the offending shape is shown
    with pytest.raises(ConfigError, match="FitNet.student_layers"):
        _module([FitNet(student_layers="features", teacher_layers="layer2")])


def test_class_count_mismatch(mnist_teacher_ckpt):
    with pytest.raises(ConfigError, match="model.teacher.checkpoint") as info:
        DistillationModule(teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)), num_classes=5)
    assert "10 classes" in str(info.value) and "5" in str(info.value)


# -- gradients: student and adapters only -----------------------------------------------
def _all_heads():
    return [
        CrossEntropy(0.1, label_smoothing=0.1),
        KLDivergence(0.5),
        LogitMSE(0.1),
        PseudoLabel(0.1, threshold=0.2),
        DKD(0.5),
        FitNet(student_layers="layer2", teacher_layers="layer2"),
        AttentionTransfer(student_layers=["layer1", "layer2"], teacher_layers=["layer1", "layer2"]),
        SimilarityPreserving(student_layers="layer3", teacher_layers="layer3"),
        RKD(student_layers="features", teacher_layers="features"),
        PKT(student_layers="features", teacher_layers="features"),
        NST(student_layers=["layer1", "layer2"], teacher_layers=["layer1", "layer2"]),
        CRD(student_layers="features", teacher_layers="features", nce_k=16),
    ]


def _step(module, n=8):
    g = _gen(3)
    batch = {
        "image": torch.randn(n, 1, 28, 28, generator=g),
        "label": torch.tensor([0, 1, 2, 3, -1, 5, -1, 7][:n]),
        "index": torch.arange(n) * 3,
    }
    teacher = module.teacher_forward(batch)
    student = module._student_taps(batch["image"])
    loss, terms = module.compute_loss(student, teacher, batch)
    loss.backward()
    return loss, terms


def test_gradients_reach_student_and_adapters_only():
    torch.manual_seed(0)
    module = _module(_all_heads())
    loss, terms = _step(module)
    assert torch.isfinite(loss) and set(terms) == {h.name for h in module.heads}
    assert all(torch.isfinite(t) for t in terms.values())

    teacher_params = list(module.teacher.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher_params)
    own = {id(p) for p in module.parameters()}
    assert not own & {id(p) for p in teacher_params}  # never in the optimizer or checkpoint

    for name, p in module.student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    adapters = dict(module.heads.named_parameters())
    assert any(k.startswith("5.connectors") for k in adapters)  # FitNet
    assert any(k.startswith("11.embed_t") for k in adapters)  # CRD's teacher-side projection
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    optim = module.configure_optimizers()
    in_optim = {id(p) for group in optim.param_groups for p in group["params"]}
    assert {id(p) for p in adapters.values()} <= in_optim
    assert not in_optim & {id(p) for p in teacher_params}
    state = module.state_dict()
    assert any(k.startswith("heads.5.connectors") for k in state)
    assert "heads.11.memory_s" in state and not any(k.startswith("teacher") for k in state)


@pytest.mark.parametrize(
    ("head", "reached", "untouched"),
    [
        (AttentionTransfer(student_layers="layer1", teacher_layers="layer1"), "layer1.0.weight", "fc.weight"),
        (FitNet(student_layers="layer2", teacher_layers="layer2"), "layer2.0.weight", "layer3.0.weight"),
        (RKD(student_layers="layer3", teacher_layers="layer3"), "layer1.0.weight", "features.0.weight"),
    ],
    ids=["at", "fitnet", "rkd"],
)
def test_feature_gradients_flow_through_hooks(head, reached, untouched):
    module = _module([head])
    _step(module)
    grads = {k: p.grad for k, p in module.student.named_parameters()}
    assert grads[reached] is not None and grads[reached].abs().sum() > 0
    assert grads[untouched] is None  # layers after the hooked one get nothing from this head


def test_schedule_scales_the_weight():
    head = DKD(weight=2.0, schedule=LinearWarmup(epochs=4))
    assert [head.current_weight(e, 0) for e in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert math.isclose(CrossEntropy(0.3).current_weight(7, 100), 0.3)
