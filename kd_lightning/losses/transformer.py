"""Token-level heads for Transformers: TinyBERT's hidden-state and attention MSE, and
DistilBERT's hidden-state cosine loss.

* Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding"
  (Findings of EMNLP), §3.1: ``L_hidn = MSE(H^S W_h, H^T)`` with a learned projection
  ``W_h`` from the student's to the teacher's width, and ``L_attn = 1/h Σ_i MSE(A_i^S,
  A_i^T)`` over the attention heads, on a layer map ``m → g(m)`` (uniform: ``g(m) = m·k``).
  Reference: huawei-noah/Pretrained-Language-Model, ``TinyBERT/task_distill.py`` (its
  ``fit_dense`` projection, a ``nn.Linear`` with bias).
* Sanh et al. 2019, "DistilBERT" §2: a cosine embedding loss that aligns the directions of
  student and teacher hidden states (reference: huggingface/transformers
  ``examples/research_projects/distillation/distiller.py``, ``alpha_cos``, on the last
  layer's states of the non-padding tokens).

Padding positions never count by default (``mask_padding: true``): every mean runs over the
tokens whose ``batch["attention_mask"]`` is 1 (for attention matrices: valid query *and*
key), so the loss of a sample does not depend on how much its batch was padded. DistilBERT
masks the same way; TinyBERT does not (``mask_padding: false`` gives its plain means over all
positions). Token-level matching needs student and teacher to read the same tokens, hence one
shared tokenization.

Which form each piece takes (the defaults, and what the shipped configs use):

* TinyBERT's exact form is ``AttentionMSE(attention: scores, mask_padding: false)`` with
  ``HiddenStateMSE(shared_projection: true, mask_padding: false)``: pre-softmax scores with
  padded keys zeroed, one ``fit_dense`` projection for every layer, plain means (its
  ``task_distill.py`` L940-L962, ``transformer/modeling.py`` L1120-L1142). The defaults
  (attention probabilities, one projection per pair, padding masked) are kd-lightning's
  form; each difference is a named option listed in the head's ``departures``.
* Projections are initialised as TinyBERT's ``init_bert_weights`` (``modeling.py`` L628-L640)
  and TextBrewer do: weights ~ N(0, 0.02), bias 0 (``init: default`` gives PyTorch's).
* ``configs/text/sst2/distilbert.yaml`` uses ``HiddenStateCosine`` on the last layers,
  DistilBERT's own form (masked, ``CosineEmbeddingLoss`` mean). No shipped config uses
  ``HiddenStateMSE`` or ``AttentionMSE``; the text tests use their defaults.

The layers are named like the text models' feature layers (``kd_lightning.models.hf``):
``embeddings``, ``hidden.{i}``, ``attention.{i}``, ``pooler``. A ``layer_map`` of
``[student_layer, teacher_layer]`` index pairs is the short form: ``[[0, 1], [1, 3]]``
means ``hidden.0 ← hidden.1`` and ``hidden.1 ← hidden.3`` (TinyBERT's ``g(m) = 2m + 1``
for a 2-layer student of a 4-layer teacher); a string entry is used as a layer name as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide

LayerRef = int | str

TB = "huawei-noah/Pretrained-Language-Model@0598f02d7fc4eaa7b4cbc1e9d7ab18bc875c24f9"
#: TinyBERT's init_bert_weights: Linear weights ~ N(0, initializer_range = 0.02), bias 0
INIT_STD = 0.02


def _projection(s_width: int, t_width: int, init: str) -> nn.Linear:
    lin = nn.Linear(s_width, t_width)
    if init == "normal":
        nn.init.normal_(lin.weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(lin.bias)
    return lin


def _check_choice(head: str, field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{head}.{field}", value, f"use one of {', '.join(choices)}")
    return value


def _layer_names(
    head: str, prefix: str, layer_map: Sequence[Sequence[LayerRef]]
) -> tuple[list[str], list[str]]:
    """``[[s, t], …]`` → (student layer names, teacher layer names)."""
    example = "e.g. [[0, 1], [1, 3]] (student layer, teacher layer)"
    if isinstance(layer_map, (str, bytes)) or not layer_map:
        raise ConfigError(f"{head}.layer_map", layer_map, f"give a list of index pairs, {example}")
    students, teachers = [], []
    for pair in layer_map:
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ConfigError(f"{head}.layer_map", layer_map, f"every entry is a pair, {example}")
        names = []
        for ref in pair:
            if isinstance(ref, bool) or not isinstance(ref, (int, str)) or (
                isinstance(ref, int) and ref < 0
            ):
                raise ConfigError(
                    f"{head}.layer_map", layer_map,
                    f"entries are layer indices >= 0 or layer names, {example}",
                )
            names.append(f"{prefix}.{ref}" if isinstance(ref, int) else ref)
        students.append(names[0])
        teachers.append(names[1])
    return students, teachers


class _TokenHead(FeatureHead):
    """Shared parts: the ``layer_map`` short form and the padding mask."""

    #: the layer family an integer in ``layer_map`` refers to
    layer_prefix = "hidden"

    def __init__(
        self, weight: float = 1.0, layer_map: Sequence[Sequence[LayerRef]] | None = None,
        **kwargs: Any,
    ) -> None:
        cls = type(self).__name__
        if layer_map is not None:
            if kwargs.get("student_layers") or kwargs.get("teacher_layers"):
                raise ConfigError(
                    f"{cls}.layer_map", layer_map,
                    "give either layer_map or student_layers/teacher_layers, not both",
                )
            kwargs["student_layers"], kwargs["teacher_layers"] = _layer_names(
                cls, self.layer_prefix, layer_map
            )
        elif not kwargs.get("student_layers"):
            raise ConfigError(
                f"{cls}.layer_map", None,
                "name the layers to match: layer_map: [[student_layer, teacher_layer], …] "
                "(e.g. [[1, 3]]) or student_layers/teacher_layers",
            )
        super().__init__(weight, **kwargs)

    def token_mask(self, batch: Batch, length: int) -> Tensor:
        """(B, L) bool mask of real tokens, shared by student and teacher."""
        # student_<key>/teacher_<key> (modules/inputs.py) mean two tokenizations
        own = "student_attention_mask" in batch or "teacher_attention_mask" in batch
        mask = batch["attention_mask"]
        if own or mask.shape[1] != length:
            raise ConfigError(
                f"{type(self).__name__}.student_layers", self.student_layers,
                "token-level matching needs student and teacher to read the same tokens: drop "
                "data.student_tokenizer, or use a logit head (KLDivergence, LogitMSE)",
            )
        return mask.bool()


class HiddenStateMSE(_TokenHead):
    """TinyBERT hidden-state loss: ``Σ_pairs mean_{real tokens, dims}((h_s W + b - h_t)²)``.

    One learned projection per pair maps the student's width onto the teacher's (or, with
    ``shared_projection``, TinyBERT's single ``fit_dense`` for every pair, applied even at
    equal widths); it is a student-side module (trained with the student, saved in the
    checkpoint). Works on token states (B, L, H), masked by ``attention_mask`` unless
    ``mask_padding: false``, and on pooled vectors (B, H).

    Args:
        weight: TinyBERT weighs its layer losses 1:1 with the prediction loss.
        layer_map: ``[[student_layer, teacher_layer], …]`` indices of ``hidden.{i}`` (or
            layer names); or give ``student_layers``/``teacher_layers`` instead.
        project: learn the projection ``W``; default (``None``): only when the widths differ.
        shared_projection: one projection for all pairs (TinyBERT's ``fit_dense``).
        mask_padding: average over real tokens only (``false``: TinyBERT's mean over all).
        init: ``normal`` (N(0, 0.02), bias 0, TinyBERT/TextBrewer) or ``default`` (PyTorch).
    """

    default_name = "hidden_mse"
    feature_ranks = (2, 3)
    reference = (
        f"{TB} TinyBERT/task_distill.py L958-L962 (rep_loss: MSELoss on fit_dense(h_s), h_t) "
        "and TinyBERT/transformer/modeling.py L1120-L1142 (fit_dense), L628-L640 (init)"
    )
    departures = (
        "shared_projection: false (default) learns one projection per layer pair, only where "
        "the widths differ; true is TinyBERT's single fit_dense on every student layer",
        "mask_padding: true (default) averages over real tokens; false is TinyBERT's mean over "
        "every position, padding included",
        "init: default uses PyTorch's Linear init; the default normal is TinyBERT's N(0, 0.02)",
    )

    def __init__(
        self, weight: float = 1.0, layer_map: Sequence[Sequence[LayerRef]] | None = None, *,
        project: bool | None = None, shared_projection: bool = False, mask_padding: bool = True,
        init: str = "normal", **kwargs: Any,
    ) -> None:
        super().__init__(weight, layer_map, **kwargs)
        if shared_projection and project is False:
            raise ConfigError("HiddenStateMSE.project", False,
                              "shared_projection always projects: drop project: false")
        self.project = project
        self.shared_projection = bool(shared_projection)
        self.mask_padding = bool(mask_padding)
        self.init = _check_choice("HiddenStateMSE", "init", init, ("normal", "default"))
        self.projections = nn.ModuleList()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        projections: list[nn.Module] = []
        for (s_name, t_name), (s_shape, t_shape) in zip(self.layer_pairs, shapes):
            if len(s_shape) != len(t_shape):
                raise ConfigError(
                    "HiddenStateMSE.student_layers", s_name,
                    f"{s_name!r} {tuple(s_shape)} and the teacher's {t_name!r} {tuple(t_shape)} "
                    "are not both token states (B, L, H) or both pooled (B, H)",
                )
            if self.project is False and s_shape[-1] != t_shape[-1]:
                raise ConfigError(
                    "HiddenStateMSE.project", False,
                    f"widths differ ({s_shape[-1]} vs {t_shape[-1]}): allow the projection",
                )
            same = s_shape[-1] == t_shape[-1] and not self.project
            projections.append(
                nn.Identity() if same else _projection(s_shape[-1], t_shape[-1], self.init)
            )
        if self.shared_projection:
            widths = {(s[-1], t[-1]) for s, t in shapes}
            if len(widths) != 1:
                raise ConfigError(
                    "HiddenStateMSE.shared_projection", True,
                    f"one projection needs one (student, teacher) width pair, got {sorted(widths)}",
                )
            ((s_width, t_width),) = widths
            projections = [_projection(s_width, t_width, self.init)]
        self.projections = nn.ModuleList(projections)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        n_proj = 1 if self.shared_projection else len(self.layer_pairs)
        if len(self.projections) != n_proj:
            raise RuntimeError("HiddenStateMSE.build() must run first: the DistillationModule does")
        total = wide(student.logits).new_zeros(())
        pairs = self.pairs(student, teacher)
        projections = list(self.projections) * len(pairs) if self.shared_projection else self.projections
        for proj, (f_s, f_t) in zip(projections, pairs):
            sq = (wide(proj(f_s)) - wide(f_t)).pow(2)
            if sq.dim() == 2 or not self.mask_padding:
                total = total + sq.mean()
                continue
            mask = self.token_mask(batch, sq.shape[1]).unsqueeze(-1)
            total = total + torch.where(mask, sq, sq.new_zeros(())).sum() / (
                mask.sum().clamp_min(1) * sq.shape[-1]
            )
        return total


class AttentionMSE(_TokenHead):
    """TinyBERT attention loss: ``Σ_pairs mean_{heads, real query i, real key j}(A_s - A_t)²``
    on attention probabilities (B, heads, L, L) of ``attention.{i}``, or with
    ``attention: scores`` on TinyBERT's pre-softmax scores of ``attention_scores.{i}``
    (there, as in TinyBERT, every score ≤ -100 (the padded keys) counts as 0 on both sides).

    TinyBERT needs as many student as teacher heads; with different counts both sides are
    averaged over their heads first (then the loss compares one map per layer).

    Args:
        weight: TinyBERT's 1.
        layer_map: ``[[student_layer, teacher_layer], …]`` indices of ``attention.{i}``
            (``attention_scores.{i}`` with ``attention: scores``).
        attention: ``probabilities`` (default) or ``scores`` (TinyBERT).
        mask_padding: average over real (query, key) pairs only (``false``: TinyBERT's mean
            over every entry).
    """

    default_name = "attention_mse"
    feature_ranks = (4,)
    layer_prefix = "attention"
    reference = f"{TB} TinyBERT/task_distill.py L940-L956 (att_loss on attention scores)"
    departures = (
        "attention: probabilities (default) matches the softmax outputs; scores is TinyBERT's "
        "pre-softmax form with padded keys zeroed",
        "mask_padding: true (default) averages over real (query, key) pairs; false is "
        "TinyBERT's mean over every entry, padded queries included",
    )

    def __init__(
        self, weight: float = 1.0, layer_map: Sequence[Sequence[LayerRef]] | None = None, *,
        attention: str = "probabilities", mask_padding: bool = True, **kwargs: Any,
    ) -> None:
        attention = _check_choice(
            "AttentionMSE", "attention", attention, ("probabilities", "scores")
        )
        if attention == "scores":  # integers in layer_map then name the score taps
            self.layer_prefix = "attention_scores"
        super().__init__(weight, layer_map, **kwargs)
        self.attention = attention
        self.mask_padding = bool(mask_padding)

    #: per pair: the head counts differ, so compare head-averaged maps (set by ``build``)
    _average_heads: tuple[bool, ...] = ()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        self._average_heads = tuple(s[1] != t[1] for s, t in shapes)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = wide(student.logits).new_zeros(())
        average = self._average_heads or (False,) * len(self.layer_pairs)
        for avg, (a_s, a_t) in zip(average, self.pairs(student, teacher)):
            a_s, a_t = wide(a_s), wide(a_t)
            if self.attention == "scores":  # TinyBERT: scores <= -1e2 (masked keys) are 0
                a_s = torch.where(a_s <= -1e2, torch.zeros_like(a_s), a_s)
                a_t = torch.where(a_t <= -1e2, torch.zeros_like(a_t), a_t)
            if avg:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            if not self.mask_padding:
                total = total + (a_s - a_t).pow(2).mean()
                continue
            tokens = self.token_mask(batch, a_s.shape[-1])
            mask = (tokens[:, :, None] & tokens[:, None, :]).unsqueeze(1)  # (B, 1, L, L)
            sq = (a_s - a_t).pow(2)
            total = total + torch.where(mask, sq, sq.new_zeros(())).sum() / (
                mask.sum().clamp_min(1) * sq.shape[1]
            )
        return total


class HiddenStateCosine(_TokenHead):
    """DistilBERT's cosine loss: ``Σ_pairs mean_{real tokens}(1 - cos(h_s, h_t))``.

    Aligns the directions of student and teacher states, so both need the same width
    (DistilBERT keeps the teacher's); on token states (B, L, H) or pooled vectors (B, H).

    Args:
        weight: DistilBERT's ``alpha_cos`` is 1.0 next to 5.0 for the soft-target CE
            (and 2.0 for the MLM loss this classification setting does not have).
        layer_map: ``[[student_layer, teacher_layer], …]`` indices of ``hidden.{i}``;
            DistilBERT matches the last layers, e.g. ``[[5, 11]]``.
    """

    default_name = "hidden_cos"
    feature_ranks = (2, 3)
    reference = (
        "huggingface/transformers@7f51f558038d1023dfb5032bba264f19f18fe559 "
        "examples/research_projects/distillation/distiller.py L114-L115 (CosineEmbeddingLoss, "
        "mean) and the alpha_cos block of Distiller.step (last layer, attention_mask selected)"
    )
    departures = ()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        for (s_name, t_name), (s_shape, t_shape) in zip(self.layer_pairs, shapes):
            if s_shape[-1] != t_shape[-1] or len(s_shape) != len(t_shape):
                raise ConfigError(
                    "HiddenStateCosine.student_layers", s_name,
                    f"{s_name!r} {tuple(s_shape)} and the teacher's {t_name!r} {tuple(t_shape)} "
                    "differ in width or rank; the cosine needs the same width (use "
                    "HiddenStateMSE, which learns a projection)",
                )

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = wide(student.logits).new_zeros(())
        for f_s, f_t in self.pairs(student, teacher):
            dist = 1.0 - F.cosine_similarity(wide(f_s), wide(f_t), dim=-1, eps=1e-8)
            if dist.dim() == 1:
                total = total + dist.mean()
                continue
            mask = self.token_mask(batch, dist.shape[1])
            total = total + torch.where(mask, dist, dist.new_zeros(())).sum() / mask.sum().clamp_min(1)
        return total
