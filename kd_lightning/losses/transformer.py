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

Padding positions never count: every mean runs over the tokens whose
``batch["attention_mask"]`` is 1 (for attention matrices: valid query *and* key), so the
loss of a sample does not depend on how much its batch was padded. Token-level matching
needs student and teacher to read the same tokens, hence one shared tokenization.

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
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput

LayerRef = int | str


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

    One learned projection per pair maps the student's width onto the teacher's; it is a
    student-side module (trained with the student, saved in the checkpoint). Works on
    token states (B, L, H), masked by ``attention_mask``, and on pooled vectors (B, H).

    Args:
        weight: TinyBERT weighs its layer losses 1:1 with the prediction loss.
        layer_map: ``[[student_layer, teacher_layer], …]`` indices of ``hidden.{i}`` (or
            layer names); or give ``student_layers``/``teacher_layers`` instead.
        project: learn the projection ``W``; default (``None``): only when the widths differ.
    """

    default_name = "hidden_mse"
    feature_ranks = (2, 3)

    def __init__(
        self, weight: float = 1.0, layer_map: Sequence[Sequence[LayerRef]] | None = None, *,
        project: bool | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(weight, layer_map, **kwargs)
        self.project = project
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
            projections.append(nn.Identity() if same else nn.Linear(s_shape[-1], t_shape[-1]))
        self.projections = nn.ModuleList(projections)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        if len(self.projections) != len(self.layer_pairs):
            raise RuntimeError("HiddenStateMSE.build() must run first: the DistillationModule does")
        total = student.logits.new_zeros((), dtype=torch.float32)
        for proj, (f_s, f_t) in zip(self.projections, self.pairs(student, teacher)):
            sq = (proj(f_s).float() - f_t.float()).pow(2)
            if sq.dim() == 2:
                total = total + sq.mean()
                continue
            mask = self.token_mask(batch, sq.shape[1]).unsqueeze(-1)
            total = total + torch.where(mask, sq, sq.new_zeros(())).sum() / (
                mask.sum().clamp_min(1) * sq.shape[-1]
            )
        return total


class AttentionMSE(_TokenHead):
    """TinyBERT attention loss: ``Σ_pairs mean_{heads, real query i, real key j}(A_s - A_t)²``
    on attention probabilities (B, heads, L, L) of ``attention.{i}``.

    TinyBERT needs as many student as teacher heads; with different counts both sides are
    averaged over their heads first (then the loss compares one map per layer).

    Args:
        weight: TinyBERT's 1.
        layer_map: ``[[student_layer, teacher_layer], …]`` indices of ``attention.{i}``.
    """

    default_name = "attention_mse"
    feature_ranks = (4,)
    layer_prefix = "attention"

    #: per pair: the head counts differ, so compare head-averaged maps (set by ``build``)
    _average_heads: tuple[bool, ...] = ()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        self._average_heads = tuple(s[1] != t[1] for s, t in shapes)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        total = student.logits.new_zeros((), dtype=torch.float32)
        average = self._average_heads or (False,) * len(self.layer_pairs)
        for avg, (a_s, a_t) in zip(average, self.pairs(student, teacher)):
            a_s, a_t = a_s.float(), a_t.float()
            if avg:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
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
        total = student.logits.new_zeros((), dtype=torch.float32)
        for f_s, f_t in self.pairs(student, teacher):
            dist = 1.0 - F.cosine_similarity(f_s.float(), f_t.float(), dim=-1, eps=1e-8)
            if dist.dim() == 1:
                total = total + dist.mean()
                continue
            mask = self.token_mask(batch, dist.shape[1])
            total = total + torch.where(mask, dist, dist.new_zeros(())).sum() / mask.sum().clamp_min(1)
        return total
