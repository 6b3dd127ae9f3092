"""DOT (kd_lightning.optim.DOT) against a hand-written two-buffer SGD, and through the CLI."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from kd_lightning.optim import DOT
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args

LR, MU, DELTA, WD = 0.1, 0.9, 0.075, 0.01


def _losses(shared, task_only, kd_only, x):
    """A task loss on (shared, task_only) and a distillation loss on (shared, kd_only)."""
    h = x @ shared
    task = ((h @ task_only) ** 2).mean()
    kd = ((h - kd_only) ** 2).sum(dim=1).mean() + 0.3 * (h.tanh() ** 2).mean()
    return task, kd


def test_dot_matches_two_buffer_sgd_reference():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=g), torch.randn(3, 2, generator=g), torch.randn(3, generator=g)]
    xs = [torch.randn(5, 4, generator=g) for _ in range(3)]

    params = [p.clone().requires_grad_() for p in init]
    opt = DOT(params, lr=LR, momentum=MU, delta=DELTA, weight_decay=WD)
    for x in xs:
        opt.zero_grad()
        opt.step(lambda x=x: opt.split_backward(*_losses(*params, x)))

    # reference, written as the equations: both buffers for `shared`, one for the others
    ref = [p.clone() for p in init]
    buf_task: dict[int, torch.Tensor] = {}
    buf_kd: dict[int, torch.Tensor] = {}
    for x in xs:
        leaves = [p.clone().requires_grad_() for p in ref]
        task, kd = _losses(*leaves, x)
        g_task = torch.autograd.grad(task, leaves, retain_graph=True, allow_unused=True)
        g_kd = torch.autograd.grad(kd, leaves, allow_unused=True)
        new = []
        for i, (p, gt, gk) in enumerate(zip(ref, g_task, g_kd)):
            step = torch.zeros_like(p)
            both = gt is not None and gk is not None
            if gt is not None:
                d = gt + WD * p
                m = MU - DELTA if both else MU
                buf_task[i] = d if i not in buf_task else m * buf_task[i] + d
                step = step + buf_task[i]
            if gk is not None:
                # mdistiller: a distillation-only parameter's first step has no weight decay
                d = gk if both or i not in buf_kd else gk + WD * p
                m = MU + DELTA if both else MU
                buf_kd[i] = d if i not in buf_kd else m * buf_kd[i] + d
                step = step + buf_kd[i]
            new.append(p - LR * step)
        ref = new
    for got, want in zip(params, ref):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # the shared parameter really has two buffers, the others one each
    assert set(opt.state[params[0]]) == {"task_momentum", "kd_momentum"}
    assert set(opt.state[params[1]]) == {"task_momentum"}
    assert set(opt.state[params[2]]) == {"kd_momentum"}


def test_dot_without_split_is_sgd():
    """A module that never splits its loss gets torch's SGD with the base momentum."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(3, 3, generator=g)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    dot = DOT([a], lr=LR, momentum=MU, delta=DELTA, weight_decay=WD)
    sgd = torch.optim.SGD([b], lr=LR, momentum=MU, weight_decay=WD)
    for _ in range(3):
        x = torch.randn(4, 3, generator=g)
        for p, opt in ((a, dot), (b, sgd)):
            opt.zero_grad()
            (x @ p).pow(2).mean().backward()
            opt.step()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"lr": 0.0}, "DOT.lr"), ({"momentum": 0.9, "delta": 0.2}, "DOT.delta"),
     ({"weight_decay": -1.0}, "DOT.weight_decay")],
)
def test_dot_rejects_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DOT([torch.zeros(1, requires_grad=True)], **kwargs)


def test_dot_fits_through_the_cli(mnist_teacher_ckpt, tmp_path):
    main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), "-c", str(CONFIGS / "kd" / "kd_dot.yaml"),
        *DEBUG_TRAINER, f"--model.init_args.teacher.checkpoint={mnist_teacher_ckpt}",
        "--data.init_args.batch_size=32", "--data.init_args.eval_batch_size=64",
        "--trainer.limit_val_batches=1", *logger_args(tmp_path / "logs"),
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}", "--test_after_fit=false",
    ])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    (opt_state,) = ckpt["optimizer_states"]
    # the module split CE from KD: every student parameter got both buffers
    buffers = [set(s) for s in opt_state["state"].values()]
    assert buffers and all(b == {"task_momentum", "kd_momentum"} for b in buffers), buffers
    assert opt_state["param_groups"][0]["delta"] == 0.075


def test_dot_with_zero_delta_is_sgd_on_the_summed_loss():
    """Δ = 0: both buffers share the momentum, and their sum is SGD's buffer of the total."""
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(4, 3, generator=g), torch.randn(3, 2, generator=g), torch.randn(3, generator=g)]
    xs = [torch.randn(5, 4, generator=g) for _ in range(3)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    # kd_only_first_decay: SGD decays the first step of the distillation-only parameter too
    dot = DOT(a, lr=LR, momentum=MU, delta=0.0, weight_decay=WD, kd_only_first_decay=True)
    sgd = torch.optim.SGD(b, lr=LR, momentum=MU, weight_decay=WD)
    for x in xs:
        dot.zero_grad()
        dot.step(lambda x=x: dot.split_backward(*_losses(*a, x)))
        sgd.zero_grad()
        sum(_losses(*b, x)).backward()
        sgd.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
