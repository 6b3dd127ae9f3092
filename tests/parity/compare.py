"""The comparison every parity test makes: values, and gradients w.r.t. every input, at 1e-6
relative (absolute floor 1e-9 of the reference's scale, for entries that are exactly zero)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RTOL = 1e-6


def assert_rel(got: Tensor, want: Tensor, what: str) -> None:
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(scale) * 1e-3,
                               msg=lambda m: f"{what}: {m}")


def assert_grads(loss: Tensor, want: Tensor, inputs: Sequence[Tensor], ref_inputs: Sequence[Tensor],
                 names: Sequence[str]) -> None:
    """d loss / d inputs equals d want / d ref_inputs, pair by pair (unused inputs: zero)."""
    g_h = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    g_r = torch.autograd.grad(want, list(ref_inputs), allow_unused=True)
    for name, a, b, x in zip(names, g_h, g_r, ref_inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert_rel(a, b, f"gradient w.r.t. {name}")
