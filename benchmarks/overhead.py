"""(a) Lightning overhead and (b) teacher cost of one KD training step.

(a) ``DistillationModule`` trained by a Lightning ``Trainer`` (logging, progress bar,
    checkpointing, summary and validation off) vs a hand-written PyTorch loop doing the
    same work: same teacher/student, batches, optimizer (SGD, momentum), loss
    (0.1·CE + 0.9·T²·KL at T=4), the same train-metric updates (accuracy + ECE) and
    running loss terms, and the same non-finite-loss check. Target ≤ 1.05. A "bare" loop
    (no metrics, no check) is printed for reference.
(b) The KD step vs (a from-scratch ``ClassifierModule`` step of the same student + one
    teacher inference forward): what KD costs beyond the teacher's forward. Target ≤ 1.10.

Run:  python -m benchmarks.overhead [--pairs mnist cifar] [--repeats 3] [--steps 30]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks._common import (
    PAIRS,
    Batches,
    Clock,
    StepClock,
    base_parser,
    machine,
    make_batches,
    quiet_trainer,
    report,
    setup_threads,
    sgd,
)
from kd_lightning.models import create_model
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.modules.metrics import classifier_metrics
from kd_lightning.modules.teacher import TeacherSpec, freeze

T = 4.0


def lightning_kd(pair: dict, batches: list[dict], warmup: int) -> tuple[float, float]:
    module = DistillationModule(
        student=pair["student"],
        teacher=TeacherSpec(model=pair["teacher"], model_kwargs=pair["teacher_kwargs"]),
        num_classes=10, input_shape=pair["shape"], optimizer=sgd,
    )
    clock = StepClock()
    quiet_trainer(max_steps=len(batches), callbacks=[clock]).fit(module, train_dataloaders=Batches(batches))
    return clock.clock.step_medians(warmup)


def lightning_scratch(pair: dict, batches: list[dict], warmup: int) -> tuple[float, float]:
    module = ClassifierModule(
        model=pair["student"], num_classes=10, input_shape=pair["shape"], optimizer=sgd
    )
    clock = StepClock()
    quiet_trainer(max_steps=len(batches), callbacks=[clock]).fit(module, train_dataloaders=Batches(batches))
    return clock.clock.step_medians(warmup)


def hand_kd(pair: dict, batches: list[dict], warmup: int, same_work: bool) -> tuple[float, float]:
    """The loop a researcher would write by hand."""
    teacher = freeze(create_model(pair["teacher"], 10, pair["shape"][0], **pair["teacher_kwargs"]))
    student = create_model(pair["student"], 10, pair["shape"][0]).train()
    optimizer = sgd(student.parameters())
    metrics = classifier_metrics(10, "train/", "student_")
    sums = torch.zeros(3)
    clock = Clock()
    for batch in batches:
        clock.tick()
        x, y = batch["image"], batch["label"]
        with torch.inference_mode():
            t_logits = teacher(x)
        t_logits = t_logits.clone()
        s_logits = student(x)
        ce = F.cross_entropy(s_logits, y)
        kd = F.kl_div(
            F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1),
            reduction="batchmean", log_target=True,
        ) * (T * T)
        loss = 0.1 * ce + 0.9 * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if same_work:
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")
            metrics.update(s_logits.detach(), y)
            sums += torch.stack([loss.detach(), ce.detach(), kd.detach()])
    clock.tick()
    return clock.step_medians(warmup)


def teacher_forward(pair: dict, batches: list[dict], warmup: int) -> tuple[float, float]:
    teacher = freeze(create_model(pair["teacher"], 10, pair["shape"][0], **pair["teacher_kwargs"]))
    clock = Clock()
    for batch in batches:
        clock.tick()
        with torch.inference_mode():
            teacher(batch["image"]).clone()
    clock.tick()
    return clock.step_medians(warmup)


def main() -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args()
    setup_threads(args.threads)
    print(machine())
    for name in args.pairs:
        pair = dict(PAIRS[name])
        batch = args.batch or pair["batch"]
        batches = make_batches(pair["shape"], batch, args.warmup + args.steps)
        a_wall, a_cpu, bare_wall, bare_cpu, b_wall, b_cpu = [], [], [], [], [], []
        ms = []
        for _ in range(args.repeats):
            kd = lightning_kd(pair, batches, args.warmup)
            hand = hand_kd(pair, batches, args.warmup, same_work=True)
            bare = hand_kd(pair, batches, args.warmup, same_work=False)
            scratch = lightning_scratch(pair, batches, args.warmup)
            tfwd = teacher_forward(pair, batches, args.warmup)
            a_wall.append(kd[0] / hand[0])
            a_cpu.append(kd[1] / hand[1])
            bare_wall.append(kd[0] / bare[0])
            bare_cpu.append(kd[1] / bare[1])
            b_wall.append(kd[0] / (scratch[0] + tfwd[0]))
            b_cpu.append(kd[1] / (scratch[1] + tfwd[1]))
            ms.append((kd[1], hand[1], bare[1], scratch[1], tfwd[1]))
        med = [statistics.median(m[i] for m in ms) * 1e3 for i in range(5)]
        print(
            f"[{name}: {pair['teacher']} -> {pair['student']}, batch {batch}] CPU ms/step: "
            f"lightning KD {med[0]:.2f}, hand KD (same work) {med[1]:.2f}, hand KD (bare) "
            f"{med[2]:.2f}, lightning scratch {med[3]:.2f}, teacher forward {med[4]:.2f}"
        )
        report("  (a) lightning KD / hand KD (same work)", a_wall, a_cpu, "<= 1.05")
        report("      lightning KD / hand KD (bare loop) ", bare_wall, bare_cpu, "(reference)")
        report("  (b) KD step / (scratch step + teacher fwd)", b_wall, b_cpu, "<= 1.10")


if __name__ == "__main__":
    main()
