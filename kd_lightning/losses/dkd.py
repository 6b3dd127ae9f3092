"""Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR), as in mdistiller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch, LossHead, check_temperature, labelled, masked_mean
from kd_lightning.losses.logit_standardization import standardize, standardized_teacher
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput, wide
from kd_lightning.losses.schedules import Schedule


def _split(log_p: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the binary (target, rest) split and of the distribution over
    the non-target classes, renormalised. Computed in log space: no ``log(1 - p)``
    round trip, so confident predictions stay finite."""
    n, c = log_p.shape
    is_target = F.one_hot(target, c).bool()
    log_target = log_p.gather(1, target[:, None])  # (N, 1)
    log_rest_each = log_p[~is_target].view(n, c - 1)  # row order is kept by boolean indexing
    log_rest = torch.logsumexp(log_rest_each, dim=1, keepdim=True)  # log(1 - p_target)
    return torch.cat([log_target, log_rest], dim=1), log_rest_each - log_rest


def _kl(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """Per-sample KL(p_t ‖ p_s) from log-probabilities."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


class DKD(LossHead):
    """Decoupled KD: ``T²·(α·TCKD + β·NCKD)``.

    KD's KL splits into TCKD, a binary KL on (p_target, 1 - p_target), and NCKD, the KL
    between the distributions over the *non-target* classes (renormalised). DKD weights
    them separately so the "dark knowledge" in NCKD is no longer suppressed by a
    confident teacher. Both terms are defined by the ground-truth class, so unlabelled
    samples (label -1) are left out of them; set ``unlabelled_nckd`` to let those
    samples still feed NCKD with the teacher's top class taken as the class to split off.
    mdistiller ramps DKD in over 20 epochs: add ``schedule: LinearWarmup`` (see
    ``configs/kd/dkd.yaml``).

    Args:
        alpha: weight of TCKD (mdistiller CIFAR-100: 1.0).
        beta: weight of NCKD (mdistiller CIFAR-100: 8.0; ImageNet: 0.5).
        temperature: T > 0 (4.0 on CIFAR-100, 1.0 on ImageNet).
        unlabelled_nckd: unlabelled samples feed NCKD around the teacher's argmax.
        logit_standardization: z-score both networks' logits per sample first (Sun et al.
            2024). Their published CIFAR-100 "DKD+LS" run had alpha=9, beta=81, T=4
            (sunshangquan/logit-standardization-KD@25b60266579aa2639ce073aa855c7ff0fbb40437
            ``tools/train.py`` L115-L118 sets beta from the scaled alpha and leaves DKD.T at 4;
            the current code gives beta 72, T 2, but the logs predate it).
    """

    default_name = "dkd"
    reference = (
        "megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259 mdistiller/distillers/DKD.py L8-L51; with LS: "
        "sunshangquan/logit-standardization-KD@f6e5aa5172bad618e801163c3385322eea673754 mdistiller/distillers/DKD.py L7-L58"
    )
    departures = (
        "unlabelled_nckd: true lets unlabelled samples (label -1, which the reference never "
        "sees) feed NCKD around the teacher's argmax; default false leaves them out",
    )
    uses_labels = True

    def __init__(
        self,
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        unlabelled_nckd: bool = False,
        logit_standardization: bool = False,
        schedule: Schedule | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule, name)
        self.temperature = check_temperature("DKD", temperature)
        for field, value in (("alpha", alpha), ("beta", beta)):
            if value < 0:
                raise ConfigError(f"DKD.{field}", value, "use a weight >= 0 (mdistiller: alpha 1, beta 8)")
        self.alpha, self.beta = float(alpha), float(beta)
        self.unlabelled_nckd = unlabelled_nckd
        self.logit_standardization = logit_standardization

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        t = self.temperature
        has_label = labelled(batch)
        target = batch["label"].clamp_min(0)
        z_s = wide(student.logits)
        if self.logit_standardization:
            z_s, teacher = standardize(z_s), standardized_teacher(teacher)
        log_p_s = F.log_softmax(z_s / t, dim=1)
        log_p_t = teacher.log_probs(t)

        bin_s, rest_s = _split(log_p_s, target)
        bin_t, rest_t = _split(log_p_t, target)
        tckd = masked_mean(_kl(bin_t, bin_s), has_label)

        if self.unlabelled_nckd and not has_label.all():
            nckd_target = torch.where(has_label, target, teacher.argmax())
            _, rest_s = _split(log_p_s, nckd_target)
            _, rest_t = _split(log_p_t, nckd_target)
            nckd = _kl(rest_t, rest_s).mean()
        else:
            nckd = masked_mean(_kl(rest_t, rest_s), has_label)
        return (self.alpha * tckd + self.beta * nckd) * t * t

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, T={self.temperature}"
