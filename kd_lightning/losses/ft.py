"""Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via Factor
Transfer" (NeurIPS), FT."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead, match_spatial
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def _conv_block(c_in: int, c_out: int, bn: bool, transpose: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 3, 1, 1)
    return [conv, *( [nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """A convolutional auto-encoder of the teacher feature; its code is the "factor"."""

    def __init__(self, channels: int, rate: float) -> None:
        super().__init__()
        k = max(1, int(channels * rate))
        self.encoder = nn.Sequential(*_conv_block(channels, channels, False),
                                     *_conv_block(channels, k, False), *_conv_block(k, k, False))
        self.decoder = nn.Sequential(*_conv_block(k, k, False, True),
                                     *_conv_block(k, channels, False, True),
                                     *_conv_block(channels, channels, False, True))


def factor(f: Tensor, p: float = 2.0) -> Tensor:
    """Channel-pooled ``mean_c f^p``, flattened and L2-normalised per sample."""
    return F.normalize(f.pow(p).mean(dim=1).flatten(1), dim=1)


class FactorTransfer(FeatureHead):
    """Factor transfer: a *paraphraser* compresses the teacher feature into factors, a
    *translator* maps the student feature to the same factor space, and the student matches
    them::

        loss = mean | factor(translator(f_s)) - factor(paraphraser.encoder(f_t)) |     (p₁=2, L1)

    The paraphraser must first be trained as an auto-encoder of the teacher feature; this
    head does that itself (a head-internal warm-up, so one fit runs both stages): during the
    first ``paraphraser_epochs`` epochs its value is the reconstruction MSE
    ``‖decoder(encoder(f_t)) - f_t‖²`` divided by the head weight (so the stage trains on the
    plain reconstruction loss, as RepDistiller's initialisation does) and the student gets no
    gradient from it; afterwards the paraphraser is frozen (its encoder runs under no_grad)
    and the translator and student train on the factor loss. To leave the student idle during
    the warm-up as RepDistiller does, give ``CrossEntropy`` an ``EpochWindow(start: …)``.
    Paraphraser and translator are head parameters (trained, checkpointed).

    Reference: RepDistiller ``FactorTransfer``/``Paraphraser``/``Translator``: rate k = 0.5,
    LeakyReLU 0.1, BN in the translator only, p₁ = 2, p₂ = 1, weight 200 with CE 1, on the
    last stage (f3), 30 paraphraser epochs before the 240 student epochs; the paraphraser
    trains at lr 0.01 for ResNet/WRN students (``helper/pretrain.py``), else at the student's:
    set ``paraphraser_lr`` to give it its own optimizer param group.

    Args:
        rate: factor channels = rate × teacher channels (0.5).
        paraphraser_epochs: epochs of the paraphraser warm-up (30); 0 skips it (a paraphraser
            loaded from a checkpoint).
        paraphraser_lr: the paraphraser's own learning rate (its optimizer param group; the
            run's scheduler scales it like the others); ``None`` shares the student's lr.
            RepDistiller: 0.01 for ResNet/WRN students.
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 distiller_zoo/FT.py "
        "L7-L31, models/util.py L7-L62, helper/pretrain.py L22-L31 L68-L71, "
        "train_student.py L239-L253"
    )
    departures = (
        "one fit: the paraphraser warm-up is this head's first paraphraser_epochs epochs, its "
        "loss divided by the head weight, where RepDistiller runs a separate init stage",
    )
    default_name = "ft"
    feature_ranks = (4,)
    single_pair = True

    def __init__(
        self, weight: float = 200.0, *, rate: float = 0.5, paraphraser_epochs: int = 30,
        paraphraser_lr: float | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(weight, **kwargs)
        if not 0 < rate <= 1:
            raise ConfigError("FactorTransfer.rate", rate, "use a rate in (0, 1] (paper: 0.5)")
        if paraphraser_epochs < 0:
            raise ConfigError("FactorTransfer.paraphraser_epochs", paraphraser_epochs,
                              "use >= 0 epochs (RepDistiller: 30)")
        if paraphraser_lr is not None and paraphraser_lr <= 0:
            raise ConfigError("FactorTransfer.paraphraser_lr", paraphraser_lr,
                              "use an lr > 0 (RepDistiller: 0.01), or leave it unset")
        self.rate, self.paraphraser_epochs = float(rate), int(paraphraser_epochs)
        self.paraphraser_lr = None if paraphraser_lr is None else float(paraphraser_lr)
        self.paraphraser: nn.Module = nn.Identity()
        self.translator: nn.Module = nn.Identity()

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        ((s, t),) = shapes
        self.paraphraser = Paraphraser(t[1], self.rate)
        k = max(1, int(t[1] * self.rate))
        self.translator = nn.Sequential(*_conv_block(s[1], s[1], True), *_conv_block(s[1], k, True),
                                        *_conv_block(k, k, True))

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The paraphraser's own param group when ``paraphraser_lr`` is set (read by
        ``configure_optimizers``)."""
        if self.paraphraser_lr is None or isinstance(self.paraphraser, nn.Identity):
            return []
        return [{"params": list(self.paraphraser.parameters()), "lr": self.paraphraser_lr}]

    def in_warmup(self) -> bool:
        return self.epoch < self.paraphraser_epochs

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        ((f_s, f_t),) = self.pairs(student, teacher)
        if self.in_warmup():
            rec = self.paraphraser.decoder(self.paraphraser.encoder(f_t))
            return F.mse_loss(rec, f_t) / max(self.weight, 1e-12)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(f_t)
        factor_s = self.translator(f_s)
        factor_s, factor_t = match_spatial(factor_s, factor_t)
        return (factor(factor_s) - factor(factor_t)).abs().mean()
