"""The loss-head interface. A new KD method is one subclass in one file plus one YAML.

A head gets ``(student, teacher, batch)`` and returns a scalar. It declares which named
layers it needs through ``student_layers``/``teacher_layers``; the DistillationModule hooks
only those. Heads that need trainable adapters (connectors, embeddings) create them in
``build`` from the feature shapes of a dummy forward, so the adapters are student-side,
in the optimizer and in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from kd_lightning.losses.schedules import Schedule

Batch = dict[str, Tensor]


class LossHead(nn.Module):
    """Base class of every loss term.

    Args:
        weight: multiplier of this term in the total loss (≥ 0).
        schedule: optional factor on ``weight`` over training, e.g. ``LinearWarmup``.
        name: the log key suffix: the term is logged as ``{stage}/loss_{name}``.
    """

    #: default log name of the head (``train/loss_<name>``)
    default_name: str = "head"
    #: whether the head reads ``batch["label"]``; unlabelled samples (label < 0) are
    #: then masked out by the head itself.
    uses_labels: bool = False
    #: buffers that every DDP process keeps identical itself (e.g. from gathered
    #: updates), so DDP must not re-broadcast them from rank 0 before every forward
    rank_consistent_buffers: tuple[str, ...] = ()
    #: the term is the task (label) loss rather than a distillation term: an optimizer
    #: with ``split_backward`` (e.g. ``kd_lightning.optim.DOT``) treats the two apart
    is_task_loss: bool = False
    #: the authors' code this head equals, as ``"<owner>/<repo>@<commit> <file> L<a>-L<b>"``;
    #: a parity test in ``tests/parity/`` proves it. The head catalogue renders it.
    reference: str = ""
    #: deliberate departures from ``reference``, one sentence each, every one a named option
    #: whose default keeps the authors' behaviour unless the sentence says otherwise
    departures: tuple[str, ...] = ()

    def __init__(
        self, weight: float = 1.0, schedule: Schedule | None = None, name: str | None = None
    ) -> None:
        super().__init__()
        if weight < 0:
            raise ConfigError(f"{type(self).__name__}.weight", weight, "use a weight >= 0")
        self.weight = float(weight)
        self.schedule = schedule
        self.name = name or self.default_name

    # -- what the head needs ---------------------------------------------------------
    @property
    def student_layers(self) -> Sequence[str]:
        return ()

    @property
    def teacher_layers(self) -> Sequence[str]:
        return ()

    #: which teacher's features a feature head matches (multi-teacher runs)
    teacher_index: int = 0

    def build(
        self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]
    ) -> None:
        """Create adapters from feature shapes (batch dimension included). Default: none."""

    # -- the loss --------------------------------------------------------------------
    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        raise NotImplementedError

    #: the training progress of the current step, set by ``current_weight`` (which the
    #: DistillationModule calls just before ``forward``): heads with their own curriculum
    #: (CTKD's temperature adversary, FT's paraphraser warm-up) read it in ``forward``
    epoch: int = 0
    global_step: int = 0

    def current_weight(self, epoch: int, step: int) -> float:
        self.epoch, self.global_step = int(epoch), int(step)
        return self.weight * (self.schedule(epoch, step) if self.schedule else 1.0)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"


def check_temperature(head: str, temperature: float) -> float:
    if temperature <= 0:
        raise ConfigError(f"{head}.temperature", temperature, "use a temperature > 0 (e.g. 4)")
    return float(temperature)


def labelled(batch: Batch) -> Tensor:
    """Boolean mask of samples with a label (unlabelled transfer-set samples carry -1)."""
    return batch["label"] >= 0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over ``mask``; an all-False mask gives a zero that still carries a graph.

    No host sync (no ``mask.all()`` branch), so a GPU step never waits on it."""
    # where, not multiply: a NaN/inf at an unlabelled position must not leak into the mean
    return torch.where(mask, values, values.new_zeros(())).sum() / mask.sum().clamp_min(1)
