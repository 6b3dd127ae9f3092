"""Token-level losses for causal-LM distillation."""

from kd_lightning.losses.lm.align import AlignedSpanLoss
from kd_lightning.losses.lm.chunked import chunked_token_loss
from kd_lightning.losses.lm.divergences import (
    DIVERGENCES,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from kd_lightning.losses.lm.heads import (
    HiddenStateDistance,
    TokenCrossEntropy,
    TokenDivergence,
    TokenHead,
)
from kd_lightning.losses.lm.uld import ULDLoss

__all__ = [
    "DIVERGENCES",
    "AlignedSpanLoss",
    "HiddenStateDistance",
    "TokenCrossEntropy",
    "TokenDivergence",
    "TokenHead",
    "ULDLoss",
    "chunked_token_loss",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
]
