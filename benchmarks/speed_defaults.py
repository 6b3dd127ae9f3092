"""Which speed settings should be defaults: channels_last (student/teacher) and compile, measured.

resnet56 → resnet20 KD (CIFAR shapes, 0.1·CE + 0.9·KL at T = 4, SGD) at batch 64, the full
training step of ``DistillationModule`` (teacher forward, student forward, loss, backward,
optimizer step) built with each setting. Rounds are interleaved — every round times every
setting on the same batches, in turn — so machine load drifts affect all settings alike;
the result per setting is the median s/step over rounds, and each setting's ratio to
all-off is the median of its per-round ratios. The untrained teacher's BatchNorm statistics
are set from a batch first (``calibrate_bn``), so it behaves like a trained network
numerically.

"Same results" is checked two ways, because they answer different questions:

- ``step0_*``: one step from the same initial weights, each setting's loss and student
  gradient against a float64 reference of the same step (all-off in double precision).
  This is the same-math check: a layout change should leave the error at fp32 rounding.
- ``max_abs_loss_diff_vs_off``: the loss trajectory over all timed steps against all-off.
  SGD on random labels is chaotic, so this drift amplifies any rounding difference;
  ``control_perturbed`` (all-off with the student's initial weights multiplied by
  1 + 1e-6·N(0, 1)) shows how far a rounding-sized change travels on its own.

    python -m benchmarks.speed_defaults --out docs/results/speed_defaults_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks._common import write_result
from benchmarks.teacher_store import calibrate_bn
from kd_lightning.losses import CrossEntropy, KLDivergence
from kd_lightning.losses.outputs import ModelOutput
from kd_lightning.machine import machine_info
from kd_lightning.modules import DistillationModule
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import TeacherSpec

#: setting → (channels_last for the student, for the teacher, compile: none|both)
SETTINGS: dict[str, tuple[bool, bool, str]] = {
    "off": (False, False, "none"),
    "student_channels_last": (True, False, "none"),
    "teacher_channels_last": (False, True, "none"),
    "both_channels_last": (True, True, "none"),
    "both_channels_last+compile": (True, True, "both"),
    "control_perturbed": (False, False, "none"),  # not a speed setting: the chaos yardstick
}


def build(setting: tuple[bool, bool, str], perturb: float = 0.0) -> tuple[DistillationModule, torch.optim.Optimizer]:
    student_cl, teacher_cl, compile_ = setting
    torch.manual_seed(0)
    module = DistillationModule(
        student="resnet20", teacher=TeacherSpec(model="resnet56", allow_untrained=True), num_classes=100, input_shape=(3, 32, 32),
        heads=[CrossEntropy(0.1), KLDivergence(0.9, temperature=4.0)],
        performance=Performance(channels_last=False, compile=compile_),
    )
    # per network, as Performance applies it to both (channels_last: true/auto)
    if student_cl:
        Performance(channels_last=True).apply(module.student, "student")
    if teacher_cl:
        for t in module.teachers:
            Performance(channels_last=True).apply(t, "teacher")
    if perturb:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in module.student.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=g).to(p.dtype))
    calibrate_bn(module.teacher, [torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    module.train()
    return module, torch.optim.SGD(module.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def step(module: DistillationModule, opt: torch.optim.Optimizer, batch: dict) -> float:
    teacher = module.teacher_forward(batch)  # the live teacher (no trainer: no cache)
    student = ModelOutput(module.student(batch["image"]), {})
    loss, _ = module.compute_loss(student, teacher, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def step0(module: DistillationModule, batch: dict, fp64: bool = False) -> tuple[float, torch.Tensor]:
    """The first step's loss and the student's flattened gradient (no optimizer step).
    ``fp64``: Σ wᵢ·headᵢ in the outputs' own precision (``compute_loss`` casts to fp32)."""
    teacher = module.teacher_forward(batch)
    student = ModelOutput(module.student(batch["image"]), {})
    if fp64:
        loss = sum(h.current_weight(0, 0) * h(student, teacher, batch) for h in module.heads)
    else:
        loss, _ = module.compute_loss(student, teacher, batch)
    loss.backward()
    grad = torch.cat([p.grad.detach().double().flatten() for p in module.student.parameters()])
    module.student.zero_grad(set_to_none=True)
    return float(loss.detach()), grad


def same_math(names: list[str], batch: dict) -> dict[str, dict[str, float]]:
    """Step 0 of each setting against the float64 reference (all-off, double precision)."""
    ref, _ = build(SETTINGS["off"])
    ref.double()
    ref_loss, ref_grad = step0(ref, {**batch, "image": batch["image"].double()}, fp64=True)
    out = {}
    for name in names:
        module, _ = build(SETTINGS[name], perturb=1e-6 if name == "control_perturbed" else 0.0)
        loss, grad = step0(module, batch)
        out[name] = {
            "step0_loss_rel_err_vs_fp64": abs(loss - ref_loss) / abs(ref_loss),
            "step0_grad_rel_err_vs_fp64": float((grad - ref_grad).norm() / ref_grad.norm()),
        }
        print(name, out[name], flush=True)
    return out


def layer_probe() -> dict[str, dict[str, float]]:
    """Where channels_last's extra error comes from: one training-mode ``BatchNorm2d`` and one
    3×3 ``Conv2d`` forward (resnet20's first stage: 16 channels at 32×32, batch 64) in fp32,
    contiguous and channels_last, each against the float64 forward of the same layer, at
    input means 0, 10 and 100 (std 1)."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    layers = {"batchnorm2d": torch.nn.BatchNorm2d(16).train(), "conv2d": torch.nn.Conv2d(16, 16, 3, padding=1)}
    out = {}
    with torch.no_grad():
        for mean in (0.0, 10.0, 100.0):
            x = torch.randn(64, 16, 32, 32, generator=g, dtype=torch.float64) + mean
            for name, layer in layers.items():
                ref = copy.deepcopy(layer).double()(x)
                errs = {}
                for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                    y = copy.deepcopy(layer).to(memory_format=fmt)(x.float().contiguous(memory_format=fmt))
                    errs[f"{layout}_rel_err_vs_fp64"] = float((y.double() - ref).norm() / ref.norm())
                out[f"{name}_input_mean_{mean:g}"] = errs
                print(name, mean, errs, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(args.batch, 3, 32, 32, generator=g),
         "label": torch.randint(0, 100, (args.batch,), generator=g),
         "index": torch.arange(args.batch), "view": torch.zeros(args.batch, dtype=torch.long)}
        for _ in range(args.steps)
    ]
    checks = same_math(args.settings, batches[0])
    models = {
        name: build(SETTINGS[name], perturb=1e-6 if name == "control_perturbed" else 0.0)
        for name in args.settings
    }
    for module, opt in models.values():  # warm-up (and compilation) outside the timing
        step(module, opt, batches[0])
    times: dict[str, list[float]] = {n: [] for n in models}
    losses: dict[str, list[float]] = {n: [] for n in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))  # no fixed position
        for name in order:
            module, opt = models[name]
            t0 = time.perf_counter()
            losses[name] += [step(module, opt, b) for b in batches]
            times[name].append((time.perf_counter() - t0) / args.steps)
            print(f"round {r} {name}: {times[name][-1]:.4f} s/step", flush=True)
    base = "off" if "off" in times else next(iter(times))
    result = {"machine": machine_info(), "threads": torch.get_num_threads(), "batch": args.batch,
              "steps_per_round": args.steps, "rounds": args.rounds, "settings": {}}
    for name, t in times.items():
        ratios = [b / x for b, x in zip(times[base], t)]
        diff = max(abs(a - b) for a, b in zip(losses[name], losses[base]))
        result["settings"][name] = {
            "s_per_step_median": round(statistics.median(t), 4),
            "s_per_step_rounds": [round(x, 4) for x in t],
            "speedup_vs_off_median": round(statistics.median(ratios), 3),
            "max_abs_loss_diff_vs_off": diff,
            **checks[name],
        }
        print(name, result["settings"][name], flush=True)
    result["layer_forward_fp32"] = layer_probe()
    write_result(result, args.out)


if __name__ == "__main__":
    main()
