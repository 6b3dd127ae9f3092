"""Parity of ``kd_lightning.optim.DOT`` with mdistiller's DistillationOrientedTrainer (issue 20).

The reference below is the arithmetic of

  megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259
    mdistiller/engine/dot.py L15-L55 (``dot``: the task loop, then the distillation loop),
    L96-L124 (``step_kd``: the parameters whose ``.grad`` the distillation loss set),
    L126-L174 (``step``), and mdistiller/engine/trainer.py L229-L243 (momentum μ - Δ for the
    task, μ + Δ for the distillation gradient) and L273-L279 (the two backward passes),

written here from that source (never imported), run on float64 parameters in every role: reached
by the task loss only, by the distillation loss only, by both, and one whose role changes from
step to step (a loss that skips it leaves its ``.grad`` None, as after ``zero_grad(set_to_none)``).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kd_lightning.optim import DOT

STEPS = 4
RTOL = 1e-6


def _losses(params: list[Tensor], x: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """shared: both losses; task_only; kd_only; switch: the task loss on even steps, the
    distillation loss on odd ones."""
    shared, task_only, kd_only, switch = params
    h = x @ shared
    task = ((h @ task_only) ** 2).mean() + 0.1 * (h.sin() ** 2).mean()
    kd = ((h - kd_only) ** 2).sum(dim=1).mean() + 0.3 * (h.tanh() ** 2).mean()
    if step % 2 == 0:
        task = task + (h * switch).sum().pow(2) * 0.01
    else:
        kd = kd + (h.cos() * switch).sum().pow(2) * 0.01
    return task, kd


def _mdistiller(
    init: list[Tensor], xs: list[Tensor], lr: float, mu: float, delta: float, wd: float, damp: float
) -> list[Tensor]:
    """dot.py L15-L55, with trainer.py's momentum = μ - Δ and momentum_kd = μ + Δ."""
    momentum, momentum_kd = mu - delta, mu + delta
    params = [p.clone() for p in init]
    state: list[dict[str, Tensor]] = [{} for _ in params]
    for step, x in enumerate(xs):
        leaves = [p.clone().requires_grad_() for p in params]
        task, kd = _losses(leaves, x, step)
        kd_grads = torch.autograd.grad(kd, leaves, retain_graph=True, allow_unused=True)
        task_grads = torch.autograd.grad(task, leaves, allow_unused=True)
        kd_idx = [i for i, g in enumerate(kd_grads) if g is not None]  # step_kd L111-L119
        task_idx = [i for i, g in enumerate(task_grads) if g is not None]  # step L143-L152
        for i in task_idx:  # L27-L42
            d_p = task_grads[i] + wd * params[i] if wd != 0 else task_grads[i]
            if momentum != 0:
                buf = state[i].get("momentum_buffer")
                if buf is None:
                    buf = d_p.clone()
                elif i in kd_idx:
                    buf = buf * momentum + (1 - damp) * d_p
                else:
                    buf = buf * ((momentum_kd + momentum) / 2.0) + (1 - damp) * d_p
                state[i]["momentum_buffer"] = buf
                d_p = buf
            params[i] = params[i] - lr * d_p
        for i in kd_idx:  # L44-L55
            d_p = kd_grads[i]
            buf = state[i].get("momentum_kd_buffer")
            if buf is None:
                buf = d_p.clone()
            elif i in task_idx:
                buf = buf * momentum_kd + (1 - damp) * d_p
            else:
                if wd != 0:
                    d_p = d_p + wd * params[i]
                buf = buf * ((momentum_kd + momentum) / 2.0) + (1 - damp) * d_p
            state[i]["momentum_kd_buffer"] = buf
            params[i] = params[i] - lr * buf
    return params


def _ours(init: list[Tensor], xs: list[Tensor], **kwargs) -> list[Tensor]:
    params = [p.clone().requires_grad_() for p in init]
    opt = DOT(params, **kwargs)
    for step, x in enumerate(xs):
        opt.zero_grad()
        opt.step(lambda x=x, step=step: opt.split_backward(*_losses(params, x, step)))
    return [p.detach() for p in params]


def _problem(seed: int) -> tuple[list[Tensor], list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3, 2), (3,), (3,)]
    init = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    xs = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return init, xs


SETTINGS = {
    "mdistiller_cifar": dict(lr=0.05, mu=0.9, delta=0.075, wd=5e-4, damp=0.0),
    "strong_decay": dict(lr=0.1, mu=0.9, delta=0.075, wd=0.05, damp=0.0),
    "dampening": dict(lr=0.1, mu=0.8, delta=0.1, wd=0.01, damp=0.3),
    "task_momentum_zero": dict(lr=0.1, mu=0.45, delta=0.45, wd=0.01, damp=0.0),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_dot_matches_mdistiller_in_every_parameter_role(setting):
    s = SETTINGS[setting]
    init, xs = _problem(0)
    want = _mdistiller(init, xs, **s)
    got = _ours(
        init,
        xs,
        lr=s["lr"],
        momentum=s["mu"],
        delta=s["delta"],
        weight_decay=s["wd"],
        dampening=s["damp"],
    )
    for role, a, b in zip(("shared", "task_only", "kd_only", "switch"), got, want):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12, msg=f"{setting}: {role}")


def test_distillation_only_parameter_first_step_has_no_weight_decay():
    """The hidden departure (issue 20 §4): mdistiller's ``dot()`` starts a distillation-only
    parameter's buffer from the bare gradient (L46-L48); the decay enters from its second step
    (L52-L53). ``kd_only_first_decay: true`` is the SGD convention, a named departure."""
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = DOT([p], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.5)
    opt.split_backward(p.new_zeros((), requires_grad=False), (p**2).sum() * 0)
    opt.step()  # zero distillation gradient: no decay on the first step, p stays
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    q = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = DOT([q], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.5, kd_only_first_decay=True)
    opt.split_backward(q.new_zeros(()), (q**2).sum() * 0)
    opt.step()  # the departure: decayed by lr·wd·q
    torch.testing.assert_close(q.detach(), torch.tensor([0.95, -1.9], dtype=torch.float64))
