"""Universal Logit Distillation (ULD): a loss between two LMs whose vocabularies differ.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
Loss for LLMs": each model's next-token probabilities are sorted in decreasing order, the
smaller vocabulary is padded with zeros to the larger one's size, and the loss is the L1
distance between the two sorted vectors, summed over the vocabulary. Sorting removes the
need for a token-to-token map (the price: it compares only the shapes of the two
distributions). The authors align the two completions by position (the first
min(n_student, n_teacher) completion tokens of each sample, Nicolas-BZRD/llm-recipes@ab6e798
models/distillation_model.py L79-L100, L128-L137, L160-L164); TRL's GOLD does the same
(``use_extended_uld=False``) or aligns byte spans first (``kd_lightning.losses.lm.align``).

Here, as every kd-lightning LM head: per-token values ``[N]``, summed by the caller and
divided by the window's token count (the authors' mean over positions, then over samples,
weights a sample's tokens by 1/its length instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import check_temperature
from kd_lightning.losses.lm.heads import TokenHead
from kd_lightning.losses.outputs import TokenOutput
from kd_lightning.losses.schedules import Schedule


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Σ_v |sort↓(p_student)_v − sort↓(p_teacher)_v| per row, the shorter vocabulary padded
    with zeros. Inputs ``[N, V_s]`` and ``[N, V_t]`` (probabilities, or any non-negative
    weights: GOLD's merged span distributions are unnormalised); returns ``[N]``."""
    s = student_probs.sort(dim=-1, descending=True).values
    t = teacher_probs.sort(dim=-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = F.pad(s, (0, width - s.shape[-1]))
    t = F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


def uld(
    student: Tensor,
    teacher: Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> Tensor:
    """ULD per token from logits ``[N, V_s]`` and ``[N, V_t]``: softmax at each model's own
    temperature (the authors' ``student_temperature``/``teacher_temperature``), then
    ``sorted_l1``. Returns ``[N]`` (fp32, float64 for float64 inputs)."""
    s = F.softmax(_f32(student) / student_temperature, -1)
    t = F.softmax(_f32(teacher) / teacher_temperature, -1)
    return sorted_l1(s, t)


def positional_pairs(student_mask: Tensor, teacher_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' positional alignment: per sample, the k-th completion token of the student
    with the k-th of the teacher, for k < min(n_student, n_teacher). Masks ``[B, T_s]`` and
    ``[B, T_t]`` (True on the completion tokens); returns two boolean masks of the same
    shapes selecting the paired tokens, in the same order when used to index."""
    n = torch.minimum(student_mask.sum(1), teacher_mask.sum(1))[:, None]
    keep_s = student_mask & (student_mask.long().cumsum(1) <= n)
    keep_t = teacher_mask & (teacher_mask.long().cumsum(1) <= n)
    return keep_s, keep_t


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_mask: Tensor,
    teacher_mask: Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """ULD over positionally paired completion tokens of a batch: logits ``[B, T_s, V_s]`` and
    ``[B, T_t, V_t]`` (already shifted: position k predicts target k), masks on the targets.
    Returns (sum over paired tokens, number of paired tokens), for token accounting."""
    keep_s, keep_t = positional_pairs(student_mask, teacher_mask)
    per_token = uld(
        student_logits[keep_s], teacher_logits[keep_t], student_temperature, teacher_temperature
    )
    return per_token.sum(), keep_s.sum()


class ULDLoss(TokenHead):
    """ULD between a student and a teacher of another tokenizer, per paired completion token.

    ``LMDistillationModule`` runs the teacher on its own tokenization of each row (the data's
    ``teacher_tokenizer``/``teacher_vocab_size``) and hands this head both outputs; the k-th
    completion token of the student is paired with the k-th of the teacher
    (``positional_pairs``, the authors' alignment) and ``uld`` compares their sorted
    distributions. Returns the sum over paired tokens; the module divides by the student's
    completion tokens (a row's unpaired tail, where one tokenization is longer, adds 0). With
    one tokenizer it is the same loss on the same positions.

    Args:
        student_temperature, teacher_temperature: each model's softmax temperature (the
            authors' defaults: 1).
        weight, schedule, name: as every head's (logged as ``train/loss_uld``).
    """

    default_name = "uld"
    #: reads a teacher of another tokenizer (``LMDistillationModule`` checks it)
    cross_tokenizer = True
    reference = "Nicolas-BZRD/llm-recipes@ab6e798 models/distillation_model.py L79-L100, L128-L137"

    def __init__(
        self,
        weight: float = 1.0,
        student_temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name)
        self.student_temperature = check_temperature("ULDLoss", student_temperature)
        self.teacher_temperature = check_temperature("ULDLoss", teacher_temperature)

    def forward(self, student: TokenOutput, teacher: TokenOutput, batch: dict) -> Tensor:
        if student.logits is None or teacher.logits is None:
            raise ConfigError(
                "model.chunk_size", self.name, "ULDLoss needs logits: set chunk_size: 0"
            )
        total, _ = uld_loss(
            student.logits,
            teacher.logits,
            student.mask,
            teacher.mask,
            self.student_temperature,
            self.teacher_temperature,
        )
        return total


__all__ = ["ULDLoss", "positional_pairs", "sorted_l1", "uld", "uld_loss"]
