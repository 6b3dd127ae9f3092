"""SGD whose weight decay can skip the 1-d parameters (biases and norm-layer scales/shifts).

hunto/image_classification_sota (DIST_KD's training code) builds SGD with two param groups:
every parameter with ``len(shape) == 1`` or a name ending ``.bias`` gets weight decay 0, the
rest the configured decay (``lib/utils/optim.py`` L23-L63 at d9662f7). A bias is always 1-d, so
"1-d" alone is the same split, and needs no parameter names: ``no_decay_1d: true`` applies it
to every param group the module passes in (a group's own settings, e.g. an lr, are kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` with ``no_decay_1d``: 1-d parameters get ``weight_decay`` 0.

    Args:
        params: parameters or param groups (what ``configure_optimizers`` passes).
        no_decay_1d: split each group into its ≥2-d parameters (decayed) and its 1-d ones
            (biases, BatchNorm weights and biases: not decayed), as DIST_KD's optimizer does.
        **kwargs: ``torch.optim.SGD``'s arguments (lr, momentum, weight_decay, nesterov, ...).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        no_decay_1d: bool = False,
        **kwargs: Any,
    ) -> None:
        self.no_decay_1d = bool(no_decay_1d)
        if self.no_decay_1d:
            params = _split_1d(params)
        super().__init__(params, lr=lr, **kwargs)


def _split_1d(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        ps = list(group["params"])
        rest = {k: v for k, v in group.items() if k != "params"}
        decayed = [p for p in ps if p.ndim > 1]
        flat = [p for p in ps if p.ndim <= 1]
        if decayed:
            out.append({**rest, "params": decayed})
        if flat:
            out.append({**rest, "params": flat, "weight_decay": 0.0})
    return out
