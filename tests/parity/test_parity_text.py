"""Parity of the text heads with TinyBERT's and DistilBERT's code (issue 20).

Each reference below is the arithmetic of the cited file, written here from its source (never
imported), on the same seeded float64 token states as the head, with the head's projection
weights copied across. Values and gradients (w.r.t. every student state and every trainable
head parameter) agree at 1e-6 relative, for equal and unequal widths and padded batches.

Sources (full commits):
  TB = huawei-noah/Pretrained-Language-Model@0598f02d7fc4eaa7b4cbc1e9d7ab18bc875c24f9
  HF = huggingface/transformers@7f51f558038d1023dfb5032bba264f19f18fe559
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from kd_lightning.losses import AttentionMSE, HiddenStateCosine, HiddenStateMSE
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from tests.parity.compare import RTOL, assert_grads, assert_rel

B, L, HEADS = 3, 6, 2
WIDTHS = {"equal_width": (8, 8), "unequal_width": (4, 8)}


def states(seed: int, *shapes: tuple[int, ...]) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def padding_mask() -> Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return mask




def check(
    head,
    s: dict[str, Tensor],
    t: dict[str, Tensor],
    reference: Callable[[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]], Tensor],
    batch: dict[str, Tensor],
) -> None:
    head.build({k: v.shape for k, v in s.items()}, {k: v.shape for k, v in t.items()})
    head = head.double()
    params = {k: p for k, p in head.named_parameters() if p.requires_grad}
    ref_params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    s_head = {k: v.clone().requires_grad_() for k, v in s.items()}
    s_ref = {k: v.clone().requires_grad_() for k, v in s.items()}
    logits = torch.zeros(B, 2, dtype=torch.float64)
    loss = head(ModelOutput(logits, s_head), TeacherOutput([ModelOutput(logits, t)]), batch)
    want = reference(s_ref, t, ref_params)
    assert_rel(loss.detach(), want.detach(), "value")
    inputs_h, inputs_r = (
        [*s_head.values(), *params.values()],
        [*s_ref.values(), *ref_params.values()],
    )
    names = [*(f"student {k}" for k in s), *params]
    assert_grads(loss, want, inputs_h, inputs_r, names)


def mse(a: Tensor, b: Tensor) -> Tensor:
    """torch.nn.MSELoss() as TinyBERT builds it (task_distill.py L903): the mean over all."""
    return ((a - b) ** 2).sum() / a.numel()


# -- TinyBERT hidden states -----------------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS)
def test_hidden_mse_tinybert_form(width):
    """TB TinyBERT/task_distill.py L958-L962 (``rep_loss += loss_mse(student_rep, teacher_rep)``
    over the mapped layers, embeddings included) on ``fit_dense(h_s)`` of
    TinyBERT/transformer/modeling.py L1126 and L1138-L1141: one Linear for every student layer,
    applied even at equal widths; padding is not masked."""
    s_w, t_w = WIDTHS[width]
    names_s, names_t = (
        ["embeddings", "hidden.0", "hidden.1"],
        ["embeddings", "hidden.1", "hidden.3"],
    )
    f = states(0, *[(B, L, s_w)] * 3, *[(B, L, t_w)] * 3)
    s, t = dict(zip(names_s, f[:3])), dict(zip(names_t, f[3:]))
    head = HiddenStateMSE(
        student_layers=names_s,
        teacher_layers=names_t,
        shared_projection=True,
        mask_padding=False,
    )

    def ref(s, t, p):
        w, b = p["projections.0.weight"], p["projections.0.bias"]
        return sum(mse(s[a] @ w.T + b, t[c]) for a, c in zip(names_s, names_t))

    check(head, s, t, ref, {"attention_mask": padding_mask()})


def test_hidden_mse_masked_default_and_per_pair_projections():
    """The default departs in two named options: padding is masked out of the mean, and
    each pair learns its own projection (none at equal width)."""
    f_s0, f_s1, f_t0, f_t1 = states(1, (B, L, 4), (B, L, 8), (B, L, 8), (B, L, 8))
    mask = padding_mask()
    head = HiddenStateMSE(layer_map=[[0, 1], [1, 3]])

    def ref(s, t, p):
        m = mask.bool()[..., None]
        proj = s["hidden.0"] @ p["projections.0.weight"].T + p["projections.0.bias"]
        total = 0
        for a, c in ((proj, t["hidden.1"]), (s["hidden.1"], t["hidden.3"])):
            total = total + ((a - c) ** 2 * m).sum() / (m.sum() * a.shape[-1])
        return total

    check(
        head,
        {"hidden.0": f_s0, "hidden.1": f_s1},
        {"hidden.1": f_t0, "hidden.3": f_t1},
        ref,
        {"attention_mask": mask},
    )
    assert isinstance(head.projections[1], torch.nn.Identity)


def test_text_projections_are_initialised_like_tinybert():
    """TB TinyBERT/transformer/modeling.py L628-L640 (``init_bert_weights``): weight ~
    N(0, initializer_range = 0.02), bias 0; ``init: default`` is PyTorch's Linear init."""
    torch.manual_seed(0)
    shapes = ({"hidden.0": torch.Size([2, 3, 128])}, {"hidden.0": torch.Size([2, 3, 256])})
    head = HiddenStateMSE(layer_map=[[0, 0]])
    head.build(*shapes)
    w, b = head.projections[0].weight.detach(), head.projections[0].bias.detach()
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001
    assert torch.count_nonzero(b) == 0
    torch_init = HiddenStateMSE(layer_map=[[0, 0]], init="default")
    torch_init.build(*shapes)
    # kaiming_uniform(a=√5): U(±1/√fan_in), std 1/√(3·128) ≈ 0.051
    assert (
        abs(float(torch_init.projections[0].weight.detach().std()) - 1 / math.sqrt(3 * 128)) < 0.003
    )


# -- TinyBERT attention ---------------------------------------------------------------------
def tb_scores(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """TB TinyBERT/transformer/modeling.py L401-L406 (``Q·Kᵀ/√d + attention_mask``) with the
    extended mask of L821-L830 (``(1 - mask)·-10000``)."""
    ext = (1.0 - mask[:, None, None, :].to(q.dtype)) * -10000.0
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + ext


@pytest.mark.parametrize("mask_padding", [False, True])
def test_attention_mse_tinybert_scores(mask_padding):
    """TB TinyBERT/task_distill.py L946-L956: scores ≤ -1e2 → 0 on both sides, then
    ``loss_mse`` (the mean over every entry), summed over the mapped layers."""
    mask = padding_mask()
    q_s, k_s, q_t, k_t = states(2, *[(B, HEADS, L, 4)] * 4)
    a_s, a_t = tb_scores(q_s, k_s, mask), tb_scores(q_t, k_t, mask)
    head = AttentionMSE(layer_map=[[0, 1]], attention="scores", mask_padding=mask_padding)
    assert list(head.student_layers) == ["attention_scores.0"]

    def ref(s, t, p):
        zs = torch.where(s["attention_scores.0"] <= -1e2, 0.0, s["attention_scores.0"])
        zt = torch.where(t["attention_scores.1"] <= -1e2, 0.0, t["attention_scores.1"])
        if not mask_padding:
            return mse(zs, zt)
        m = (mask.bool()[:, :, None] & mask.bool()[:, None, :])[:, None]  # the named departure
        return ((zs - zt) ** 2 * m).sum() / (m.sum() * HEADS)

    check(
        head,
        {"attention_scores.0": a_s},
        {"attention_scores.1": a_t},
        ref,
        {"attention_mask": mask},
    )


def test_bert_score_taps_are_tinybert_scores():
    """The ``attention_scores.{i}`` tap of a BERT equals TB modeling.py L396-L406 computed from
    that layer's own query/key projections."""
    from kd_lightning.models.text import bert

    torch.manual_seed(0)
    model = bert(layers=2, hidden=8, heads=HEADS, vocab_size=30, max_length=L).double().eval()
    got: dict[str, Tensor] = {}
    layer = model.model.bert.encoder.layer[1].attention.self
    layer.query.register_forward_hook(lambda m, i, o: got.__setitem__("x", i[0]))
    model.attention_scores[1].register_forward_hook(lambda m, i, o: got.__setitem__("s", o))
    ids, mask = torch.randint(1, 30, (B, L)), padding_mask()
    model(ids, mask)
    x = got["x"]

    def heads(y: Tensor) -> Tensor:
        return y.view(B, L, HEADS, -1).transpose(1, 2)

    want = tb_scores(heads(layer.query(x)), heads(layer.key(x)), mask)
    torch.testing.assert_close(got["s"], want, rtol=RTOL, atol=1e-9)


# -- DistilBERT cosine --------------------------------------------------------------------
def test_hidden_cosine_distilbert():
    """HF examples/research_projects/distillation/distiller.py: ``Distiller.step``'s alpha_cos
    block (last hidden states, ``masked_select`` by the attention mask, target 1) through
    ``nn.CosineEmbeddingLoss(reduction="mean")`` (L114-L115), whose arithmetic for target 1 is
    ``1 - x·y / sqrt((|x|² + 1e-12)(|y|² + 1e-12))`` averaged over the selected tokens."""
    mask = padding_mask()
    f_s, f_t = states(3, (B, L, 8), (B, L, 8))
    head = HiddenStateCosine(layer_map=[[1, 3]])

    def ref(s, t, p):
        sel = mask.bool()[..., None].expand_as(s["hidden.1"])
        x = torch.masked_select(s["hidden.1"], sel).view(-1, 8)
        y = torch.masked_select(t["hidden.3"], sel).view(-1, 8)
        eps = 1e-12
        cos = (x * y).sum(1) / torch.sqrt(((x * x).sum(1) + eps) * ((y * y).sum(1) + eps))
        return (1 - cos).mean()

    check(head, {"hidden.1": f_s}, {"hidden.3": f_t}, ref, {"attention_mask": mask})


@pytest.mark.parametrize("cls", [HiddenStateMSE, AttentionMSE, HiddenStateCosine])
def test_text_heads_name_their_reference(cls):
    assert cls.reference, cls
    for sentence in cls.departures:
        option = sentence.split(":")[0]
        assert option in cls.__init__.__code__.co_varnames, (cls, option)
