"""Zhao et al. 2023, "DOT: A Distillation-Oriented Trainer" (ICCV), as in mdistiller
(``mdistiller/engine/dot.py`` and the ``DOT`` trainer in ``mdistiller/engine/trainer.py``).

SGD whose momentum treats the two gradients of a KD loss apart. With ``g_task`` the
gradient of the task loss (the heads with ``is_task_loss``, i.e. cross-entropy) and
``g_kd`` that of the distillation terms, a parameter that receives both keeps two buffers::

    b_task ← (μ - Δ)·b_task + (1 - d)·(g_task + λ·θ)
    b_kd   ← (μ + Δ)·b_kd   + (1 - d)·g_kd
    θ      ← θ - lr·(b_task + b_kd)

so the distillation direction carries more momentum than the task direction (the paper's
remedy for the task loss dominating optimisation). A parameter that receives only one of the
two (e.g. an adapter that only a feature head uses) keeps one buffer with the plain
momentum μ = ((μ - Δ) + (μ + Δ))/2, weight decay included. A buffer starts as the first
gradient itself (as in ``torch.optim.SGD``), with one exception kept from mdistiller: a
parameter reached by the distillation loss only starts its buffer from ``g_kd`` *without*
the weight decay (its ``dot()`` adds the decay only in the non-first branch); the decay
applies from its second step on. Likewise, as there, the task buffer is skipped when
μ - Δ = 0. mdistiller CIFAR-100 defaults: lr 0.05, μ 0.9, Δ 0.075, λ 5e-4.

Reference: megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259
``mdistiller/engine/dot.py`` L15-L55 (``dot``) and L96-L174, ``mdistiller/engine/trainer.py``
L229-L279 (the ``DOT`` trainer: μ ∓ Δ, ``loss_kd.backward`` then ``loss_ce.backward``).

How the gradients are split: ``DistillationModule`` calls ``split_backward(task, distill)``
instead of ``loss.backward()`` when its optimizer has that method. The distillation gradient
is taken with ``torch.autograd.grad`` and kept here; the task loss backpropagates into
``.grad`` as usual. Consequences: gradient accumulation works (both parts accumulate until
``step``), gradient clipping by the trainer sees only the task gradient, and a module that
never calls ``split_backward`` (e.g. a teacher's ``ClassifierModule``) gets plain SGD with
momentum μ. The two backward passes are not made for DDP's gradient hooks or for fp16 loss
scaling: use it on one device, in fp32 or bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from kd_lightning.errors import ConfigError


class DOT(torch.optim.Optimizer):
    """SGD with separate momentum for task and distillation gradients (see the module doc).

    Args:
        params: the parameters (or parameter groups) to optimise.
        lr: learning rate (mdistiller CIFAR-100: 0.05).
        momentum: the base momentum μ (0.9).
        delta: Δ: the task momentum is μ - Δ, the distillation momentum μ + Δ (0.075).
        weight_decay: L2 penalty λ, added to the task gradient (5e-4).
        dampening: SGD dampening d (0).
        kd_only_first_decay: also add the weight decay to the first step of a parameter that
            only the distillation loss reaches (``torch.optim.SGD``'s convention); the
            reference (default ``false``) leaves it out of that first step.
    """

    reference = (
        "megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259 "
        "mdistiller/engine/dot.py L15-L55; mdistiller/engine/trainer.py L229-L279"
    )
    departures = (
        "kd_only_first_decay: true adds the weight decay to a distillation-only parameter's "
        "first step, which the reference skips (default false, as the reference)",
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.05,
        momentum: float = 0.9,
        delta: float = 0.075,
        weight_decay: float = 5e-4,
        dampening: float = 0.0,
        kd_only_first_decay: bool = False,
    ) -> None:
        checks = (
            ("lr", lr, lr > 0, "use a learning rate > 0 (mdistiller: 0.05)"),
            ("momentum", momentum, 0.0 <= momentum < 1.0, "use a momentum in [0, 1) (0.9)"),
            ("delta", delta, delta >= 0 and momentum - delta >= 0 and momentum + delta < 1.0,
             f"use 0 <= delta with momentum ± delta in [0, 1) (momentum {momentum}; paper 0.075)"),
            ("weight_decay", weight_decay, weight_decay >= 0, "use a weight decay >= 0 (5e-4)"),
            ("dampening", dampening, 0.0 <= dampening < 1.0, "use a dampening in [0, 1) (0)"),
        )
        for field, value, ok, fix in checks:
            if not ok:
                raise ConfigError(f"DOT.{field}", value, fix)
        defaults = {"lr": lr, "momentum": momentum, "delta": delta,
                    "weight_decay": weight_decay, "dampening": dampening,
                    "kd_only_first_decay": bool(kd_only_first_decay)}
        super().__init__(params, defaults)
        #: distillation gradients since the last step, by parameter (never checkpointed:
        #: they live between ``split_backward`` and ``step`` of one optimisation step)
        self._kd_grads: dict[Tensor, Tensor] = {}

    def split_backward(self, task_loss: Tensor, distill_loss: Tensor) -> None:
        """Backpropagate the two parts apart: ``distill_loss`` into this optimizer's own
        store, ``task_loss`` into ``.grad``."""
        if distill_loss.requires_grad:
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            grads = torch.autograd.grad(
                distill_loss, params, retain_graph=task_loss.requires_grad, allow_unused=True
            )
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p in self._kd_grads:
                    self._kd_grads[p].add_(g)
                else:
                    self._kd_grads[p] = g
        if task_loss.requires_grad:
            task_loss.backward()

    @staticmethod
    def _update(state: dict[str, Any], key: str, d_p: Tensor, momentum: float,
                dampening: float) -> Tensor:
        buf = state.get(key)
        if buf is None:
            buf = state[key] = torch.clone(d_p).detach()
        else:
            buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
        return buf

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, delta = group["lr"], group["momentum"], group["delta"]
            wd, damp = group["weight_decay"], group["dampening"]
            first_decay = group.get("kd_only_first_decay", False)
            mu_task, mu_kd = mu - delta, mu + delta
            for p in group["params"]:
                g_task = p.grad
                g_kd = self._kd_grads.pop(p, None)
                if g_task is None and g_kd is None:
                    continue
                state = self.state[p]
                both = g_task is not None and g_kd is not None
                # mdistiller's first loop: the task gradient, always with the decay; no
                # buffer at all when its momentum μ - Δ is 0
                if g_task is not None:
                    d_p = g_task.add(p, alpha=wd) if wd else g_task
                    if mu_task:
                        d_p = self._update(state, "task_momentum", d_p,
                                           mu_task if both else mu, damp)
                    p.add_(d_p, alpha=-lr)
                # its second loop: the distillation gradient, always with a buffer; the decay
                # only for a parameter the task loss does not reach, and not on its first step
                if g_kd is not None:
                    d_p = g_kd
                    if not both and wd and ("kd_momentum" in state or first_decay):
                        d_p = g_kd.add(p, alpha=wd)
                    p.add_(self._update(state, "kd_momentum", d_p, mu_kd if both else mu, damp),
                           alpha=-lr)
        self._kd_grads.clear()
        return loss
