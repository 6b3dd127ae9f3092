"""A token loss that never holds both models' full-vocabulary logits.

``chunked_token_loss`` takes the final hidden states and LM-head weights of student and
teacher and returns Σₙ wₙ·f(student logitsₙ, teacher logitsₙ). It walks the tokens in
chunks of ``chunk_size``: only one chunk's ``[chunk, V]`` logits exist at a time, and the
forward keeps no graph: backward recomputes each chunk's logits and takes its gradient
(activation recomputation, as in Liger's fused linear losses, in pure PyTorch). Peak
memory is then O(chunk·V) instead of O(N·V) for each of the two models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: (student logits [n, V], teacher logits [n, V], targets [n]) → per-token values [n]
TokenFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _logits(hidden: Tensor, weight: Tensor, vocab: int) -> Tensor:
    return hidden @ weight[:vocab].t()


class _ChunkedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, weights, targets, fn, chunk, vocab):
        wide = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=wide, device=s_hidden.device)
        for i in range(0, s_hidden.shape[0], chunk):
            s = _logits(s_hidden[i : i + chunk], s_weight, vocab)
            t = _logits(t_hidden[i : i + chunk], t_weight, vocab)
            total += (fn(s, t, targets[i : i + chunk]) * weights[i : i + chunk]).sum()
        ctx.save_for_backward(s_hidden, s_weight, t_hidden, t_weight, weights, targets)
        ctx.fn, ctx.chunk, ctx.vocab = fn, chunk, vocab
        return total

    @staticmethod
    def backward(ctx, grad):
        s_hidden, s_weight, t_hidden, t_weight, weights, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_hidden = torch.zeros_like(s_hidden) if need_h else None
        g_weight = torch.zeros_like(s_weight) if need_w else None
        w = s_weight.detach().requires_grad_(need_w)
        for i in range(0, s_hidden.shape[0], ctx.chunk):
            h = s_hidden[i : i + ctx.chunk].detach().requires_grad_(need_h)
            with torch.enable_grad():
                t = _logits(t_hidden[i : i + ctx.chunk], t_weight, ctx.vocab)
                y = targets[i : i + ctx.chunk]
                loss = (ctx.fn(_logits(h, w, ctx.vocab), t, y) * weights[i : i + ctx.chunk]).sum()
                inputs = [x for x, need in ((h, need_h), (w, need_w)) if need]
                grads = list(torch.autograd.grad(loss, inputs))
            if need_h:
                g_hidden[i : i + ctx.chunk] = grads.pop(0)
            if need_w:
                g_weight += grads.pop(0)
        scale = grad.to(s_hidden.dtype)
        return (
            g_hidden * scale if need_h else None,
            g_weight * scale if need_w else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_token_loss(
    s_hidden: Tensor,
    s_weight: Tensor,
    t_hidden: Tensor,
    t_weight: Tensor,
    weights: Tensor,
    fn: TokenFn,
    targets: Tensor | None = None,
    chunk_size: int = 256,
    vocab: int | None = None,
) -> Tensor:
    """Σₙ weightsₙ·fn(s_hiddenₙ·s_weightᵀ, t_hiddenₙ·t_weightᵀ, targetsₙ) over ``[N, D]``
    hidden rows (``targets``: next-token ids, for a CE term; zeros when not given).

    ``vocab`` cuts both heads to their first ``vocab`` rows (the shared real vocabulary of
    padded embedding tables). The teacher's tensors get no gradient."""
    vocab = vocab if vocab is not None else min(s_weight.shape[0], t_weight.shape[0])
    wide = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
    if targets is None:
        targets = torch.zeros(s_hidden.shape[0], dtype=torch.long, device=s_hidden.device)
    return _ChunkedTokenLoss.apply(
        s_hidden,
        s_weight,
        t_hidden.detach(),
        t_weight.detach(),
        weights.detach().to(wide),
        targets,
        fn,
        int(chunk_size),
        int(vocab),
    )
