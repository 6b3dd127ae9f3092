"""Parity of the feature-map heads with their authors' code (issue 20).

Each reference below is the arithmetic of the cited file, written here from its source (never
imported), evaluated on the same seeded float64 tensors as the head, with the head's adapter
weights copied across. Values and gradients (w.r.t. every student feature and every trainable
head parameter) must agree at 1e-6 relative, for every spatial relation the model zoo allows
(student map smaller than, equal to, larger than the teacher's) and for equal and unequal
channel widths.

Sources (full commits):
  RD  = HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403
  OD  = clovaai/overhaul-distillation@76344a84a7ce23c894f41a2e05b866c9b73fd85a
  MD  = megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259
  RV  = dvlab-research/ReviewKD@cede6ea6387ae9b6127de0e561507177bf19c11e
  ABD = bhheo/AB_distillation@a7701d3506e13da87bda75aba1cee6397408144f
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses import (
    AB,
    FSP,
    KDSVD,
    NST,
    OFD,
    VID,
    AttentionTransfer,
    FactorTransfer,
    FitNet,
    ReviewKD,
)
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from tests.parity.compare import assert_grads, assert_rel

N = 4
#: spatial relations (student H, teacher H): the zoo's stages differ by factors of 2, and a
#: valid-conv ratio (6 → 4) for RepDistiller's ConvReg
SPATIAL = {"smaller": (4, 8), "equal": (4, 4), "larger": (8, 4), "larger_odd": (6, 4)}
#: channel relations (student C, teacher C)
WIDTHS = {"equal_width": (6, 6), "unequal_width": (4, 6)}
RELATIONS = [(s, w) for s in SPATIAL for w in WIDTHS]


def maps(seed: int, *shapes: tuple[int, ...], relu: bool = False) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    return [x.relu() for x in out] if relu else out


def built(head, s: dict[str, Tensor], t: dict[str, Tensor]):
    torch.manual_seed(0)  # the adapters' init: copied into the reference anyway
    head.build({k: v.shape for k, v in s.items()}, {k: v.shape for k, v in t.items()})
    return head.double().train()




def check(
    head,
    s: dict[str, Tensor],
    t: dict[str, Tensor],
    reference: Callable[[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]], Tensor],
    batch: dict[str, Tensor] | None = None,
) -> Tensor:
    """The head and ``reference(student, teacher, params)`` agree in value and in the gradient
    w.r.t. each student feature and each trainable head parameter (``params`` holds copies
    of the head's parameters by name). Returns the head's value."""
    params = {k: p for k, p in head.named_parameters() if p.requires_grad}
    ref_params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    s_head = {k: v.clone().requires_grad_() for k, v in s.items()}
    s_ref = {k: v.clone().requires_grad_() for k, v in s.items()}
    logits = torch.zeros(N, 3, dtype=torch.float64)
    loss = head(ModelOutput(logits, s_head), TeacherOutput([ModelOutput(logits, t)]), batch or {})
    want = reference(s_ref, t, ref_params)
    assert_rel(loss.detach(), want.detach(), "value")
    inputs_h = [*s_head.values(), *params.values()]
    inputs_r = [*s_ref.values(), *ref_params.values()]
    names = [*(f"student {k}" for k in s), *params]
    assert_grads(loss, want, inputs_h, inputs_r, names)
    return loss.detach()


def bn_train(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """BatchNorm2d in training mode (batch statistics, biased variance, eps 1e-5)."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)


def pool_pair(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """RD distiller_zoo/AT.py L19-L25 (also NST.py L17-L23, VID.py L40-L46, FT.py L18-L24):
    the larger map is adaptive-average-pooled to the smaller's (H, H)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def rel_maps(seed: int, spatial: str, width: str, relu: bool = True) -> tuple[Tensor, Tensor]:
    (s_h, t_h), (s_c, t_c) = SPATIAL[spatial], WIDTHS[width]
    f_s, f_t = maps(seed, (N, s_c, s_h, s_h), (N, t_c, t_h, t_h))
    return (f_s.relu(), f_t.relu()) if relu else (f_s, f_t)


# -- FitNet -------------------------------------------------------------------------------
def ref_conv_reg(x: Tensor, t_h: int, p: dict[str, Tensor], prefix: str, relu: bool) -> Tensor:
    """RD models/util.py L131-L154 (``ConvReg``; MD mdistiller/distillers/_common.py L6-L30)."""
    s_h = x.shape[2]
    w, b = p[prefix + "proj.0.weight"], p[prefix + "proj.0.bias"]
    if s_h == 2 * t_h:
        x = F.conv2d(x, w, b, stride=2, padding=1)
    elif s_h * 2 == t_h:
        x = F.conv_transpose2d(x, w, b, stride=2, padding=1)
    else:
        assert s_h >= t_h, "ConvReg raises NotImplemented here"
        x = F.conv2d(x, w, b)
    x = bn_train(x, p[prefix + "proj.1.weight"], p[prefix + "proj.1.bias"])
    return x.relu() if relu else x


@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_fitnet(spatial, width):
    f_s, f_t = rel_maps(1, spatial, width)
    head = built(FitNet(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})

    def reference(s, t, p):  # RD distiller_zoo/FitNet.py L6-L14: MSE of ConvReg(f_s) and f_t
        return F.mse_loss(ref_conv_reg(s["a"], t["b"].shape[2], p, "connectors.0.", True), t["b"])

    check(head, {"a": f_s}, {"b": f_t}, reference)


@pytest.mark.parametrize("dims", [(8, 8), (6, 10)])
def test_fitnet_flat_hint(dims):
    f_s, f_t = maps(17, (N, dims[0]), (N, dims[1]), relu=True)
    head = built(FitNet(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})

    def reference(s, t, p):  # RD models/util.py L157-L168 (Regress: linear, ReLU), FitNet.py
        x = F.linear(s["a"].view(N, -1), p["connectors.0.proj.weight"], p["connectors.0.proj.bias"])
        return F.mse_loss(x.relu(), t["b"])

    check(head, {"a": f_s}, {"b": f_t}, reference)


# -- AT, NST ----------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_attention_transfer(spatial, width):
    f_s, f_t = rel_maps(2, spatial, width)
    g_s, g_t = maps(3, (N, 3, 8, 8), (N, 5, 8, 8), relu=True)  # a second pair: the sum
    s, t = {"a": f_s, "c": g_s}, {"b": f_t, "d": g_t}
    head = built(AttentionTransfer(student_layers=["a", "c"], teacher_layers=["b", "d"]), s, t)

    def at(f):  # RD distiller_zoo/AT.py L28-L29
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    def reference(s, t, p):  # RD distiller_zoo/AT.py L15-L26, summed over pairs
        total = 0
        for a, b in (("a", "b"), ("c", "d")):
            x, y = pool_pair(s[a], t[b])
            total = total + (at(x) - at(y)).pow(2).mean()
        return total

    check(head, s, t, reference)


@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_nst(spatial, width):
    f_s, f_t = rel_maps(4, spatial, width)
    head = built(NST(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})

    def poly(a, b):  # RD distiller_zoo/NST.py L38-L42
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    def reference(s, t, p):  # RD distiller_zoo/NST.py L16-L34 (full_loss)
        x, y = pool_pair(s["a"], t["b"])
        x = F.normalize(x.view(x.shape[0], x.shape[1], -1), dim=2)
        y = F.normalize(y.view(y.shape[0], y.shape[1], -1), dim=2)
        return poly(y, y).mean().detach() + poly(x, x).mean() - 2 * poly(x, y).mean()

    check(head, {"a": f_s}, {"b": f_t}, reference)


# -- VID ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_vid(spatial, width):
    f_s, f_t = rel_maps(5, spatial, width)
    head = built(VID(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    # RD VID.py L33-L35: log_scale = log(exp(init_pred_var - eps) - 1)
    want_init = math.log(math.exp(5.0 - 1e-5) - 1.0)
    torch.testing.assert_close(head.regressors[0].log_scale.detach(),
                               torch.full((f_t.shape[1],), want_init, dtype=torch.float64))

    def reference(s, t, p):  # RD distiller_zoo/VID.py L20-L54 (VIDLoss(s, t, t))
        x, y = pool_pair(s["a"], t["b"])
        w = [p[f"regressors.0.mean.{i}.weight"] for i in (0, 2, 4)]
        mean = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, w[0])), w[1])), w[2])
        var = torch.log(1.0 + torch.exp(p["regressors.0.log_scale"])) + 1e-5
        var = var.view(1, -1, 1, 1)
        return torch.mean(0.5 * ((mean - y) ** 2 / var + torch.log(var)))

    check(head, {"a": f_s}, {"b": f_t}, reference)


# -- FT -----------------------------------------------------------------------------------
def _leaky_convs(x: Tensor, p: dict[str, Tensor], prefix: str, idx: list[int], bn: bool,
                 transpose: bool = False) -> Tensor:
    """RD models/util.py L13-L34 / L49-L59: conv (3×3, pad 1, bias) [+ BN] + LeakyReLU(0.1)."""
    conv = F.conv_transpose2d if transpose else F.conv2d
    for i in idx:
        x = conv(x, p[f"{prefix}.{i}.weight"], p[f"{prefix}.{i}.bias"], padding=1)
        if bn:
            x = bn_train(x, p[f"{prefix}.{i + 1}.weight"], p[f"{prefix}.{i + 1}.bias"])
        x = F.leaky_relu(x, 0.1)
    return x


@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_factor_transfer(spatial, width):
    f_s, f_t = rel_maps(6, spatial, width)
    head = built(FactorTransfer(student_layers="a", teacher_layers="b", paraphraser_epochs=1),
                 {"a": f_s}, {"b": f_t})

    def encode(y, p):  # RD models/util.py L13-L23, use_bn=False
        return _leaky_convs(y, p, "paraphraser.encoder", [0, 2, 4], bn=False)

    def warmup(s, t, p):  # RD helper/pretrain.py L68-L71: MSE(paraphraser(f_t), f_t)
        rec = _leaky_convs(encode(t["b"], p), p, "paraphraser.decoder", [0, 2, 4], False, True)
        return F.mse_loss(rec, t["b"]) / 200.0  # the head's value × its weight 200

    head.current_weight(0, 0)
    check(head, {"a": f_s}, {"b": f_t}, warmup)

    def factor(f):  # RD distiller_zoo/FT.py L30-L31
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    def reference(s, t, p):  # RD distiller_zoo/FT.py L14-L28; helper/loops.py (factor branch)
        factor_s = _leaky_convs(s["a"], p, "translator", [0, 3, 6], bn=True)
        with torch.no_grad():
            factor_t = encode(t["b"], p)
        x, y = pool_pair(factor_s, factor_t)
        return (factor(x) - factor(y)).abs().mean()

    head.current_weight(1, 0)
    check(head, {"a": f_s}, {"b": f_t}, reference)


def test_factor_transfer_paraphraser_lr_is_its_own_param_group():
    """RD helper/pretrain.py L22-L31: the paraphraser trains at lr 0.01 (ResNet/WRN students)
    while the student's lr is 0.05: ``paraphraser_lr`` gives it that lr as its own group."""
    from functools import partial

    from kd_lightning.modules import DistillationModule
    from kd_lightning.modules.teacher import TeacherSpec

    def module(**ft):
        head = FactorTransfer(student_layers="layer2", teacher_layers="layer2", **ft)
        return DistillationModule(
            student="lenet5", teacher=TeacherSpec(model="lenet5", model_kwargs={"width": 2}, allow_untrained=True),
            heads=[head], optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        )

    m = module(paraphraser_lr=0.01)
    rest, group = m.configure_optimizers().param_groups
    paraphraser = {id(p) for p in m.heads[0].paraphraser.parameters()}
    assert group["lr"] == 0.01 and {id(p) for p in group["params"]} == paraphraser
    assert rest["lr"] == 0.05 and not paraphraser & {id(p) for p in rest["params"]}
    assert {id(p) for p in m.heads[0].translator.parameters()} <= {id(p) for p in rest["params"]}
    (shared,) = module().configure_optimizers().param_groups  # unset: one lr for all
    assert shared["lr"] == 0.05


# -- FSP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", list(SPATIAL))
def test_fsp(spatial):
    s_h, t_h = SPATIAL[spatial]
    # two consecutive stages per network, the second at half the size (a strided stage)
    s0, s1, t0, t1 = maps(8, (N, 3, s_h, s_h), (N, 5, s_h // 2, s_h // 2),
                          (N, 3, t_h, t_h), (N, 5, t_h // 2, t_h // 2), relu=True)
    s, t = {"a": s0, "b": s1}, {"a": t0, "b": t1}
    head = built(FSP(student_layers=["a", "b"], teacher_layers=["a", "b"]), s, t)

    def compute_fsp(bot, top):  # RD distiller_zoo/FSP.py L30-L48
        b_h, t_h = bot.shape[2], top.shape[2]
        if b_h > t_h:
            bot = F.adaptive_avg_pool2d(bot, (t_h, t_h))
        elif b_h < t_h:
            top = F.adaptive_avg_pool2d(top, (b_h, b_h))
        bot = bot.unsqueeze(1)
        top = top.unsqueeze(2)
        bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
        top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
        return (bot * top).mean(-1)

    def reference(s, t, p):  # RD distiller_zoo/FSP.py L19-L27
        return (compute_fsp(s["a"], s["b"]) - compute_fsp(t["a"], t["b"])).pow(2).mean()

    check(head, s, t, reference)


# -- KDSVD --------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", list(SPATIAL))
def test_kdsvd(spatial):
    s_h, t_h = SPATIAL[spatial]
    s0, s1, t0, t1 = maps(9, (N, 5, s_h, s_h), (N, 6, s_h, s_h), (N, 5, t_h, t_h),
                          (N, 6, t_h, t_h), relu=True)
    s, t = {"a": s0, "b": s1}, {"a": t0, "b": t1}
    head = built(KDSVD(student_layers=["a", "b"], teacher_layers=["a", "b"]), s, t)

    def removenan(x):
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    def svd(feat, n):  # RD distiller_zoo/KDSVD.py L45-L61
        size = feat.shape
        x = feat.view(-1, size[1], size[2] * size[2]).transpose(-2, -1)
        u, sv, v = torch.svd(x)
        u, sv, v = removenan(u), removenan(sv), removenan(v)
        return (F.normalize(u[:, :, :n], dim=1), F.normalize(sv[:, :n], dim=1),
                F.normalize(v[:, :, :n], dim=1))

    def align_rsv(a, b):  # RD distiller_zoo/KDSVD.py L68-L75
        cosine = torch.matmul(a.transpose(-2, -1), b)
        max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
        mask = torch.where(torch.eq(max_abs_cosine, torch.abs(cosine)), torch.sign(cosine),
                           torch.zeros_like(cosine))
        return torch.matmul(a, mask), b

    def reference(s, t, p):  # RD distiller_zoo/KDSVD.py L17-L43 (k = 1), summed
        v_sb = v_tb = None
        losses = []
        for i, (f_s, f_t) in enumerate(((s["a"], t["a"]), (s["b"], t["b"]))):
            _, s_t, v_t = svd(f_t, 1)
            _, _, v_s = svd(f_s, 4)
            v_s, v_t = align_rsv(v_s, v_t)
            s_t = s_t.unsqueeze(1)
            v_t, v_s = v_t * s_t, v_s * s_t
            if i > 0:
                s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
                t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
                l2 = (s_rbf - t_rbf.detach()).pow(2)
                losses.append(torch.where(torch.isfinite(l2), l2, torch.zeros_like(l2)).sum())
            v_tb, v_sb = v_t, v_s
        return sum(loss / N for loss in losses)

    check(head, s, t, reference)


# -- AB -----------------------------------------------------------------------------------
def ref_ab(s_feats: list[Tensor], t_feats: list[Tensor], margin: float = 1.0) -> Tensor:
    """RD distiller_zoo/AB.py L11-L29 (ABLoss), the losses summed (train_student/pretrain)."""
    n = len(s_feats)
    w = [2 ** (i - n + 1) for i in range(n)]

    def alt_l2(source, target):
        loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float()
                + (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())
        return torch.abs(loss).sum()

    losses = [wi * alt_l2(a, b) for wi, a, b in zip(w, s_feats, t_feats)]
    return sum(loss / N / 1000 * 3 for loss in losses)


@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_ab(spatial, width):
    f_s, f_t = rel_maps(10, spatial, width, relu=False)  # pre-ReLU features
    g_s, g_t = maps(11, (N, 3, 2, 2), (N, 3, 2, 2))  # a second, equal-shape pair
    s, t = {"a": f_s, "c": g_s}, {"b": f_t, "d": g_t}
    head = built(AB(student_layers=["a", "c"], teacher_layers=["b", "d"]), s, t)
    # RD models/util.py L79-L80, ABD models/distillation_module.py L17-L20: no connector where
    # the widths (and sizes) match
    assert isinstance(head.connectors[1], torch.nn.Identity)
    same = f_s.shape[1:] == f_t.shape[1:]
    assert isinstance(head.connectors[0], torch.nn.Identity) == same

    def reference(s, t, p):  # else RD models/util.py L81-L82: ConvReg(use_relu=False)
        x = s["a"] if same else ref_conv_reg(s["a"], t["b"].shape[2], p, "connectors.0.", False)
        return ref_ab([x, s["c"]], [t["b"], t["d"]])

    check(head, s, t, reference)


def test_ab_connector_init_is_the_authors():
    """ABD models/distillation_module.py L29-L36: conv ~ N(0, sqrt(2/n)), n = k·k·out; BN 1, 0."""
    torch.manual_seed(0)
    f_s, f_t = maps(12, (64, 32, 4, 4), (64, 256, 4, 4))
    head = built(AB(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    conv, bn = head.connectors[0].proj
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / 256), rel=0.05)
    assert (bn.weight == 1).all() and (bn.bias == 0).all()
    default = built(AB(student_layers="a", teacher_layers="b", init="default"),
                    {"a": f_s}, {"b": f_t})
    # PyTorch's kaiming_uniform(a=√5): std = 1 / sqrt(3·fan_in) = 0.102 for fan_in 32
    assert default.connectors[0].proj[0].weight.std().item() == pytest.approx(
        1 / math.sqrt(3 * 32), rel=0.05)


# -- OFD ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_ofd(spatial, width):
    f_s, f_t = rel_maps(13, spatial, width, relu=False)
    g_s, g_t = maps(14, (N, 3, 2, 2), (N, 5, 2, 2))
    s, t = {"a": f_s, "c": g_s}, {"b": f_t, "d": g_t}
    head = built(OFD(student_layers=["a", "c"], teacher_layers=["b", "d"]), s, t)
    # the margin is the documented departure (a running E[t | t < 0] rather than the teacher
    # BN's Gaussian expectation): compute it as the head does, then the authors' loss with it
    margins = [(y.clamp_max(0).sum(dim=(0, 2, 3)) / (y < 0).sum(dim=(0, 2, 3)).clamp_min(1))
               .view(1, -1, 1, 1) for y in (f_t, g_t)]

    def distillation_loss(source, target, margin):  # OD CIFAR-100/distiller.py L9-L13
        target = torch.max(target, margin)
        loss = F.mse_loss(source, target, reduction="none")
        return (loss * ((source > target) | (target > 0)).float()).sum()

    def reference(s, t, p):  # MD OFD.py L142-L161 (OD distiller.py L60-L72, equal sizes)
        total = 0
        for i, (a, b) in enumerate((("a", "b"), ("c", "d"))):
            r = bn_train(F.conv2d(s[a], p[f"connectors.{i}.proj.0.weight"]),
                         p[f"connectors.{i}.proj.1.weight"], p[f"connectors.{i}.proj.1.bias"])
            y = F.adaptive_avg_pool2d(t[b], r.shape[-2:])
            total = total + distillation_loss(r, y, margins[i]) / N / 2 ** (2 - i - 1)
        return total

    check(head, s, t, reference)


def test_ofd_connector_init_is_the_authors():
    """OD CIFAR-100/distiller.py L15-L27 (MD OFD.py L41-L60): N(0, sqrt(2/n)), BN 1, 0."""
    torch.manual_seed(0)
    f_s, f_t = maps(15, (64, 32, 4, 4), (64, 256, 4, 4))
    head = built(OFD(student_layers="a", teacher_layers="b"), {"a": f_s}, {"b": f_t})
    conv, bn = head.connectors[0].proj
    assert conv.bias is None and conv.kernel_size == (1, 1)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / 256), rel=0.05)
    assert (bn.weight == 1).all() and (bn.bias == 0).all()


# -- ReviewKD -----------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,width", RELATIONS)
def test_reviewkd(spatial, width):
    (s_h, t_h), (s_c, t_c) = SPATIAL[spatial], WIDTHS[width]
    # three stages, shallow to deep, then the pooled embedding (a 1×1 map)
    shapes_s = [(N, s_c, s_h, s_h), (N, 2 * s_c, s_h // 2, s_h // 2), (N, 2 * s_c)]
    shapes_t = [(N, t_c, t_h, t_h), (N, 2 * t_c, t_h // 2, t_h // 2), (N, 2 * t_c)]
    feats = maps(16, *shapes_s, *shapes_t)
    s = dict(zip("abc", feats[:3]))
    t = dict(zip("def", feats[3:]))
    head = built(ReviewKD(student_layers=list("abc"), teacher_layers=list("def")), s, t)

    def hcl(fstudent, fteacher):  # MD ReviewKD.py L11-L28 (RV train.py hcl)
        loss_all = 0.0
        for fs, ft in zip(fstudent, fteacher):
            h = fs.shape[2]
            loss = F.mse_loss(fs, ft, reduction="mean")
            cnt, tot = 1.0, 1.0
            for level in [4, 2, 1]:
                if level >= h:
                    continue
                cnt /= 2.0
                loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (level, level)),
                                         F.adaptive_avg_pool2d(ft, (level, level))) * cnt
                tot += cnt
            loss_all = loss_all + loss / tot
        return loss_all

    def abf(i, x, y, shape, out_shape, p):  # RV CIFAR-100/model/reviewkd.py L20-L56
        n, _, h, w = x.shape
        q = f"abfs.{i}."
        x = bn_train(F.conv2d(x, p[q + "conv1.0.weight"]), p[q + "conv1.1.weight"],
                     p[q + "conv1.1.bias"])
        if y is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = torch.sigmoid(F.conv2d(torch.cat([x, y], dim=1), p[q + "att.0.weight"],
                                       p[q + "att.0.bias"]))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = bn_train(F.conv2d(x, p[q + "conv2.0.weight"], padding=1), p[q + "conv2.1.weight"],
                     p[q + "conv2.1.bias"])
        return y, x

    def reference(s, t, p):  # RV reviewkd.py L58-L86; student features reversed, deep first
        xs = [s["a"], s["b"], s["c"][:, :, None, None]][::-1]
        shapes = [x.shape[-1] for x in xs]
        ts = [t["d"], t["e"], t["f"][:, :, None, None]]
        out_shapes = [y.shape[-1] for y in ts[::-1]]
        idx = [2, 1, 0]  # our abfs are listed shallow to deep
        results = []
        out, res = abf(idx[0], xs[0], None, None, out_shapes[0], p)
        results.append(out)
        for j in range(1, 3):
            out, res = abf(idx[j], xs[j], res, shapes[j], out_shapes[j], p)
            results.insert(0, out)
        return hcl(results, ts)

    check(head, s, t, reference)
