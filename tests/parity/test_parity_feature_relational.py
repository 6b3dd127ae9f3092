"""Parity of the relational and embedding heads (SP, RKD, PKT, CC, CRD) with RepDistiller.

As in ``test_parity_feature_maps``: the reference is the cited file's arithmetic written here,
on identical seeded float64 tensors with the head's embeddings copied across; values and
gradients at 1e-6 relative, over flat embeddings of equal and unequal widths and feature maps
of every spatial relation.

  RD = HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import CRD, PKT, RKD, CorrelationCongruence, SimilarityPreserving
from tests.parity.test_parity_feature_maps import (
    RELATIONS,
    N,
    assert_rel,
    built,
    check,
    maps,
    rel_maps,
)

FLAT = {"flat_equal": ((N, 8), (N, 8)), "flat_unequal": ((N, 6), (N, 10))}
SHAPES = [*FLAT, *(f"{s}/{w}" for s, w in RELATIONS)]


def features(seed: int, shape: str):
    if shape in FLAT:
        return maps(seed, *FLAT[shape])
    return rel_maps(seed, *shape.split("/"))


@pytest.mark.parametrize("shape", SHAPES)
def test_similarity_preserving(shape):
    f_s, f_t = features(1, shape)
    head = built(SimilarityPreserving(student_layers="a", teacher_layers="b"), {"a": f_s},
                 {"b": f_t})

    def reference(s, t, p):  # RD distiller_zoo/SP.py L16-L30
        bsz = s["a"].shape[0]
        x, y = s["a"].view(bsz, -1), t["b"].view(bsz, -1)
        g_s = F.normalize(torch.mm(x, torch.t(x)))
        g_t = F.normalize(torch.mm(y, torch.t(y)))
        g_diff = g_t - g_s
        return ((g_diff * g_diff).view(-1, 1).sum(0) / (bsz * bsz)).squeeze()

    check(head, {"a": f_s}, {"b": f_t}, reference)


def _pdist(e, eps=1e-12):  # RD distiller_zoo/RKD.py L47-L58
    e_square = e.pow(2).sum(dim=1)
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


@pytest.mark.parametrize("shape", SHAPES)
def test_rkd(shape):
    f_s, f_t = features(2, shape)
    head = built(RKD(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})

    def reference(s, t, p):  # RD distiller_zoo/RKD.py L15-L45 (w_d 25, w_a 50)
        student, teacher = s["a"].view(N, -1), t["b"].view(N, -1)
        with torch.no_grad():
            t_d = _pdist(teacher)
            t_d = t_d / t_d[t_d > 0].mean()
        d = _pdist(student)
        d = d / d[d > 0].mean()
        loss_d = F.smooth_l1_loss(d, t_d)
        with torch.no_grad():
            norm_td = F.normalize(teacher.unsqueeze(0) - teacher.unsqueeze(1), p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
        norm_sd = F.normalize(student.unsqueeze(0) - student.unsqueeze(1), p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
        return 25 * loss_d + 50 * F.smooth_l1_loss(s_angle, t_angle)

    check(head, {"a": f_s}, {"b": f_t}, reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_pkt(shape):
    f_s, f_t = features(3, shape)
    head = built(PKT(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})

    def reference(s, t, p, eps=1e-7):  # RD distiller_zoo/PKT.py L16-L42 (features flattened)
        out, tgt = s["a"].view(N, -1), t["b"].view(N, -1)
        out = out / (torch.sqrt(torch.sum(out**2, dim=1, keepdim=True)) + eps)
        tgt = tgt / (torch.sqrt(torch.sum(tgt**2, dim=1, keepdim=True)) + eps)
        model_sim = (torch.mm(out, out.transpose(0, 1)) + 1.0) / 2.0
        target_sim = (torch.mm(tgt, tgt.transpose(0, 1)) + 1.0) / 2.0
        model_sim = model_sim / torch.sum(model_sim, dim=1, keepdim=True)
        target_sim = target_sim / torch.sum(target_sim, dim=1, keepdim=True)
        return torch.mean(target_sim * torch.log((target_sim + eps) / (model_sim + eps)))

    check(head, {"a": f_s}, {"b": f_t}, reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_correlation_congruence(shape):
    f_s, f_t = features(4, shape)
    head = built(CorrelationCongruence(student_layers="a", teacher_layers="b", feat_dim=5),
                 {"a": f_s}, {"b": f_t})

    def reference(s, t, p):  # RD CC.py L14-L17 on LinearEmbed (models/util.py L185-L194)
        e_s = F.linear(s["a"].view(N, -1), p["embed_s.weight"], p["embed_s.bias"])
        e_t = F.linear(t["b"].view(N, -1), p["embed_t.weight"], p["embed_t.bias"])
        delta = torch.abs(e_s - e_t)
        return torch.mean((delta[:-1] * delta[1:]).sum(1))

    check(head, {"a": f_s}, {"b": f_t}, reference)


def test_correlation_congruence_normalize_is_the_named_departure():
    f_s, f_t = maps(5, (N, 8), (N, 12))
    head = built(CorrelationCongruence(student_layers="a", teacher_layers="b", feat_dim=5,
                                       normalize=True), {"a": f_s}, {"b": f_t})

    def reference(s, t, p):
        e_s = F.normalize(F.linear(s["a"], p["embed_s.weight"], p["embed_s.bias"]), dim=1)
        e_t = F.normalize(F.linear(t["b"], p["embed_t.weight"], p["embed_t.bias"]), dim=1)
        delta = torch.abs(e_s - e_t)
        return torch.mean((delta[:-1] * delta[1:]).sum(1))

    check(head, {"a": f_s}, {"b": f_t}, reference)


@pytest.mark.parametrize("shape", ["flat_equal", "flat_unequal", "larger/unequal_width"])
def test_crd(shape):
    f_s, f_t = features(6, shape)
    n_data, k, feat_dim, nce_t, momentum = 10, 6, 5, 0.07, 0.5
    head = built(CRD(student_layers="a", teacher_layers="b", num_samples=n_data,
                     feat_dim=feat_dim, nce_k=k), {"a": f_s}, {"b": f_t})
    index = torch.tensor([3, 0, 7, 9])
    memory_v1 = head.memory_s.detach().clone()  # RD memory.py L19-L21: uniform ±1/sqrt(d/3)
    memory_v2 = head.memory_t.detach().clone()
    std = 1 / (feat_dim / 3) ** 0.5
    assert memory_v1.abs().max() <= std and memory_v2.abs().max() <= std
    torch.manual_seed(123)
    contrast_idx = torch.cat([index[:, None], torch.randint(0, n_data, (N, k))], dim=1)
    updated = {}

    def embed(x, p, name):  # RD crd/criterion.py L79-L102 (Embed: linear, then x / ‖x‖₂)
        x = F.linear(x.view(x.shape[0], -1), p[f"{name}.weight"], p[f"{name}.bias"])
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))

    def contrast_loss(x):  # RD crd/criterion.py L51-L76
        m, pn, eps = x.size(1) - 1, 1 / float(n_data), 1e-7
        log_d1 = torch.div(x[:, 0], x[:, 0] + (m * pn + eps)).log()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(torch.full_like(p_neg, m * pn), p_neg + (m * pn + eps)).log()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)).squeeze() / x.shape[0]

    def reference(s, t, p):  # RD crd/criterion.py L31-L48, crd/memory.py L23-L79
        v1, v2 = embed(s["a"], p, "embed_s"), embed(t["b"], p, "embed_t")
        w1 = torch.index_select(memory_v1, 0, contrast_idx.view(-1)).view(N, k + 1, feat_dim)
        out_v2 = torch.exp(torch.bmm(w1, v2.view(N, feat_dim, 1)) / nce_t)
        w2 = torch.index_select(memory_v2, 0, contrast_idx.view(-1)).view(N, k + 1, feat_dim)
        out_v1 = torch.exp(torch.bmm(w2, v1.view(N, feat_dim, 1)) / nce_t)
        z_v1 = (out_v1.mean() * n_data).item()
        z_v2 = (out_v2.mean() * n_data).item()
        out_v1, out_v2 = out_v1 / z_v1, out_v2 / z_v2
        with torch.no_grad():
            for bank, v, key in ((memory_v1, v1, "s"), (memory_v2, v2, "t")):
                pos = torch.index_select(bank, 0, index) * momentum + v * (1 - momentum)
                new = bank.clone()
                new.index_copy_(0, index, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
                updated[key] = new
        return contrast_loss(out_v1.squeeze(2)) + contrast_loss(out_v2.squeeze(2))

    torch.manual_seed(123)  # the head draws its negatives with the same call
    check(head, {"a": f_s}, {"b": f_t}, reference, batch={"index": index})
    assert_rel(head.memory_s, updated["s"], "student memory after the update")
    assert_rel(head.memory_t, updated["t"], "teacher memory after the update")


FEATURE_HEADS = ["FitNet", "AttentionTransfer", "SimilarityPreserving", "RKD", "PKT", "NST", "CRD",
                 "CorrelationCongruence", "AB", "OFD", "VID", "KDSVD", "FSP", "FactorTransfer",
                 "ReviewKD"]


@pytest.mark.parametrize("name", FEATURE_HEADS)
def test_every_feature_head_names_its_reference_at_a_full_commit(name):
    import re

    import kd_lightning.losses as losses

    head = getattr(losses, name)
    assert re.search(r"[\w-]+/[\w.-]+@[0-9a-f]{40} \S+\.py L\d+-L\d+", head.reference), name
    assert all(isinstance(d, str) and d for d in head.departures)


@pytest.mark.parametrize("name,kwargs,field", [
    ("FitNet", {"resize": "nearest"}, "FitNet.resize"),
    ("AB", {"connector": "never"}, "AB.connector"),
    ("AB", {"init": "xavier"}, "AB.init"),
    ("OFD", {"init": "xavier"}, "OFD.init"),
    ("FactorTransfer", {"paraphraser_lr": 0.0}, "FactorTransfer.paraphraser_lr"),
])
def test_the_departure_options_reject_bad_values(name, kwargs, field):
    import kd_lightning.losses as losses
    from kd_lightning.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        getattr(losses, name)(student_layers="a", teacher_layers="b", **kwargs)
    assert info.value.field == field
