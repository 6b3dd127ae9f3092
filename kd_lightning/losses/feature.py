"""The shared base of feature heads: named layer pairs, shape checks, spatial matching.

A feature head compares the student's and one teacher's intermediate outputs, named by
module path (``layer3``, ``features.12``). Layers are given as lists that pair up by
position: ``student_layers[i]`` is matched to ``teacher_layers[i]``; the head's value is
the sum over pairs (as in RepDistiller, where a multi-layer method sums its groups).

Subclasses do not repeat the shared constructor: they give their own default weight and
keyword-only options and pass the rest up, e.g.
``def __init__(self, weight: float = 1000.0, *, p: float = 2.0, **kwargs: Any)`` with
``super().__init__(weight, **kwargs)``; jsonargparse follows ``**kwargs`` to this
constructor, so YAML and the CLI still see every argument. A layer name ending in ``:input``
taps the module's input, i.e. a pre-activation feature (``kd_lightning.modules.features``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import LossHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from kd_lightning.losses.schedules import Schedule


def _as_list(layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return []
    if isinstance(layers, str):
        return [layers]
    return [str(layer) for layer in layers]


class FeatureHead(LossHead):
    """Base class of heads on named intermediate layers.

    Args:
        weight: multiplier of this term in the total loss (≥ 0).
        student_layers: student module path(s), e.g. ``layer2`` or ``[layer1, layer2]``.
        teacher_layers: teacher module path(s), paired with ``student_layers`` by position.
        teacher_index: which teacher's features to match in a multi-teacher run.
        schedule: optional factor on ``weight`` over training.
        name: log key suffix (``train/loss_<name>``).
    """

    #: the feature ranks the head accepts (incl. batch dim); ``None`` = any rank
    feature_ranks: tuple[int, ...] | None = None
    #: the head compares one pair only (e.g. embeddings for CRD)
    single_pair: bool = False

    def __init__(
        self,
        weight: float = 1.0,
        student_layers: str | list[str] | None = None,
        teacher_layers: str | list[str] | None = None,
        teacher_index: int = 0,
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name)
        cls = type(self).__name__
        self._student_layers = _as_list(student_layers)
        self._teacher_layers = _as_list(teacher_layers)
        example = "e.g. layer3 (list a model's layers with kd_lightning.models)"
        if not self._student_layers:
            raise ConfigError(
                f"{cls}.student_layers", student_layers,
                f"a feature head needs at least one student layer, named by module path, {example}",
            )
        if not self._teacher_layers:
            raise ConfigError(
                f"{cls}.teacher_layers", teacher_layers,
                f"a feature head needs at least one teacher layer, named by module path, {example}",
            )
        if len(self._student_layers) != len(self._teacher_layers):
            raise ConfigError(
                f"{cls}.teacher_layers", self._teacher_layers,
                f"layers pair up by position: give as many teacher layers as student layers "
                f"({self._student_layers})",
            )
        if self.single_pair and len(self._student_layers) != 1:
            raise ConfigError(
                f"{cls}.student_layers", self._student_layers,
                "this head matches exactly one layer pair (usually the pre-logit embedding)",
            )
        if teacher_index < 0:
            raise ConfigError(f"{cls}.teacher_index", teacher_index, "use a teacher index >= 0")
        self.teacher_index = int(teacher_index)

    @property
    def student_layers(self) -> Sequence[str]:
        return tuple(self._student_layers)

    @property
    def teacher_layers(self) -> Sequence[str]:
        return tuple(self._teacher_layers)

    @property
    def layer_pairs(self) -> list[tuple[str, str]]:
        return list(zip(self._student_layers, self._teacher_layers))

    # -- construction ----------------------------------------------------------------
    def build(
        self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]
    ) -> None:
        """Check every pair's shapes, then let the subclass size its adapters."""
        pairs = []
        for s_name, t_name in self.layer_pairs:
            s_shape = self._shape(student_shapes, "student_layers", s_name)
            t_shape = self._shape(teacher_shapes, "teacher_layers", t_name)
            self._check_rank("student_layers", s_name, s_shape)
            self._check_rank("teacher_layers", t_name, t_shape)
            pairs.append((s_shape, t_shape))
        self.build_pairs(pairs)

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        """Create adapters from the (student, teacher) shapes of each pair. Default: none."""

    def _shape(self, shapes: dict[str, torch.Size], field: str, layer: str) -> torch.Size:
        if layer not in shapes:  # the module exists but the model's forward never calls it
            raise ConfigError(
                f"{type(self).__name__}.{field}", layer,
                "this module does not run in the model's forward pass; name one that does",
            )
        return shapes[layer]

    def _check_rank(self, field: str, layer: str, shape: torch.Size) -> None:
        if self.feature_ranks is None or len(shape) in self.feature_ranks:
            return
        want = " or ".join(f"{r}-D" for r in self.feature_ranks)
        hint = (
            "a convolutional stage such as layer2" if 4 in self.feature_ranks
            else "a flat layer such as the pre-logit embedding (features, pool)"
        )
        raise ConfigError(
            f"{type(self).__name__}.{field}", layer,
            f"this head needs {want} features (batch dim included) but {layer!r} outputs shape "
            f"{tuple(shape)}; pick {hint}",
        )

    # -- the loss --------------------------------------------------------------------
    def pairs(self, student: ModelOutput, teacher: TeacherOutput) -> list[tuple[Tensor, Tensor]]:
        """The (student, teacher) feature tensors of each configured pair."""
        t_features = teacher.member(self.teacher_index).features
        return [(student.features[s], t_features[t]) for s, t in self.layer_pairs]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pairs={self.layer_pairs}"


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two (N, C, H, W) maps to the smaller one's size.

    Pooling (never upsampling) keeps both maps honest summaries of their own layer;
    RepDistiller's AT and NST losses match spatial sizes the same way.
    """
    s_hw, t_hw = f_s.shape[-2:], f_t.shape[-2:]
    if s_hw == t_hw:
        return f_s, f_t
    size = (min(s_hw[0], t_hw[0]), min(s_hw[1], t_hw[1]))
    if s_hw != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if t_hw != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


#: the connector initialisations a head may choose: the authors' He-normal one, or PyTorch's
CONNECTOR_INITS = ("he", "default")


def he_init_(module: nn.Module) -> nn.Module:
    """The connector initialisation of the OFD and AB authors: conv weights ~ N(0, √(2/n)) with
    n = k_h·k_w·out_channels, BatchNorm γ = 1, β = 0 (clovaai/overhaul-distillation@76344a84a7ce23c894f41a2e05b866c9b73fd85a4a7ce23c894f41a2e05b866c9b73fd85a
    CIFAR-100/distiller.py L15-L27; bhheo/AB_distillation@a7701d3506e13da87bda75aba1cee6397408144f models/distillation_module.py
    L29-L36)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
    return module


def check_init(head: str, init: str) -> str:
    if init not in CONNECTOR_INITS:
        raise ConfigError(
            f"{head}.init", init,
            "use 'he' (the authors' N(0, sqrt(2/n)) conv init) or 'default' (PyTorch's)",
        )
    return init
