"""(a) Lightning overhead and (b) teacher cost of one KD training step.

(a) ``DistillationModule`` trained by a Lightning ``Trainer`` (logging, progress bar,
    checkpointing, summary and validation off) vs a hand-written PyTorch loop doing the
    same work: same teacher/student, batches, optimizer (SGD, momentum), loss
    (0.1·CE + 0.9·T²·KL at T=4), the same train-metric updates (accuracy + ECE) and
    running loss terms, and the same non-finite-loss check. Target ≤ 1.05. Printed for
    reference: a "bare" hand loop (no metrics, no check), and Lightning's own floor: a
    minimal LightningModule whose ``training_step`` is the hand loop's step, verbatim.
(b) The KD step vs (a from-scratch ``ClassifierModule`` step of the same student + one
    teacher inference forward): what KD costs beyond the teacher's forward. Target ≤ 1.10.

How: the hand-written steps run interleaved with Lightning's, on the same batches
(``Interleaved``), and every ratio is a median of per-step ratios, so the machine's drift
(other processes, clock changes; larger than 5 % on a shared VM) cancels out. (b) divides
two such ratios that share the hand KD step as their yardstick: (Lightning KD / hand KD)
over ((Lightning scratch + teacher forward) / hand KD).

Run:  python -m benchmarks.overhead [--pairs mnist cifar] [--repeats 3] [--steps 30]
"""

from __future__ import annotations

import statistics

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks._common import (
    PAIRS,
    Batches,
    Interleaved,
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


class HandKD:
    """The loop a researcher would write by hand, one step per call. ``same_work`` adds
    what the Lightning module also does per step: train-metric updates (accuracy + ECE),
    running loss terms and the non-finite-loss check."""

    def __init__(self, pair: dict, same_work: bool) -> None:
        shape = pair["shape"]
        self.teacher = freeze(create_model(pair["teacher"], 10, shape[0], **pair["teacher_kwargs"]))
        self.student = create_model(pair["student"], 10, shape[0]).train()
        self.optimizer = sgd(self.student.parameters())
        self.metrics = classifier_metrics(10, "train/")
        self.sums = torch.zeros(3)
        self.same_work = same_work

    def loss(self, batch: dict) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        with torch.inference_mode():
            t_logits = self.teacher(x)
        t_logits = t_logits.clone()
        s_logits = self.student(x)
        ce = F.cross_entropy(s_logits, y)
        kd = F.kl_div(
            F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1),
            reduction="batchmean", log_target=True,
        ) * (T * T)
        loss = 0.1 * ce + 0.9 * kd
        if self.same_work:
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")
            self.metrics.update(s_logits.detach(), y)
            self.sums += torch.stack([loss.detach(), ce.detach(), kd.detach()])
        return loss

    def step(self, batch: dict) -> None:
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class TeacherForward:
    """One teacher inference forward per call (the part of a KD step a scratch step lacks)."""

    def __init__(self, pair: dict) -> None:
        self.teacher = freeze(create_model(pair["teacher"], 10, pair["shape"][0], **pair["teacher_kwargs"]))

    def step(self, batch: dict) -> None:
        with torch.inference_mode():
            self.teacher(batch["image"]).clone()


class MinimalKD(L.LightningModule):
    """Lightning's floor: the hand loop's step as a ``training_step``, nothing else."""

    def __init__(self, pair: dict) -> None:
        super().__init__()
        self.hand = HandKD(pair, same_work=True)
        self.student = self.hand.student

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.hand.loss(batch)

    def configure_optimizers(self):
        return sgd(self.student.parameters())


class InMemory(L.LightningDataModule):
    """The batches, from a DataModule that (like kd-lightning's) reports that none of its
    training labels is hidden, so the module takes its fully-labelled path."""

    num_unlabelled = 0

    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> Batches:
        return Batches(self.batches)


def fit(module: L.LightningModule, batches: list[dict], refs: dict) -> Interleaved:
    paired = Interleaved(refs)
    quiet_trainer(max_steps=len(batches), callbacks=[paired]).fit(module, datamodule=InMemory(batches))
    return paired


def distiller(pair: dict) -> DistillationModule:
    return DistillationModule(
        student=pair["student"],
        teacher=TeacherSpec(model=pair["teacher"], model_kwargs=pair["teacher_kwargs"], allow_untrained=True),
        num_classes=10, input_shape=pair["shape"], optimizer=sgd,
    )


def main() -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args()
    setup_threads(args.threads)
    print(machine())
    for name in args.pairs:
        pair = dict(PAIRS[name])
        batch = args.batch or pair["batch"]
        batches = make_batches(pair["shape"], batch, args.warmup + args.steps)
        rows: dict[str, list[tuple[float, float]]] = {"a": [], "bare": [], "floor": [], "b": []}
        ms = []
        for _ in range(args.repeats):
            kd = fit(distiller(pair), batches, {"same": HandKD(pair, True), "bare": HandKD(pair, False)})
            floor = fit(MinimalKD(pair), batches, {"same": HandKD(pair, True)})
            scratch = fit(
                ClassifierModule(model=pair["student"], num_classes=10, input_shape=pair["shape"], optimizer=sgd),
                batches, {"same": HandKD(pair, True), "teacher": TeacherForward(pair)},
            )
            w = args.warmup
            rows["a"].append(kd.ratios("same", w))
            rows["bare"].append(kd.ratios("bare", w))
            rows["floor"].append(floor.ratios("same", w))
            rows["b"].append(tuple(k / s for k, s in zip(kd.ratios("same", w), scratch.ratios("same", w, plus="teacher"))))
            ms.append((kd.median_ms(None, w), kd.median_ms("same", w), kd.median_ms("bare", w),
                       floor.median_ms(None, w), scratch.median_ms(None, w), scratch.median_ms("teacher", w)))
        med = [statistics.median(m[i] for m in ms) for i in range(6)]
        print(
            f"[{name}: {pair['teacher']} -> {pair['student']}, batch {batch}] CPU ms/step: "
            f"lightning KD {med[0]:.2f}, hand KD (same work) {med[1]:.2f}, hand KD (bare) "
            f"{med[2]:.2f}, minimal LightningModule {med[3]:.2f}, lightning scratch {med[4]:.2f}, "
            f"teacher forward {med[5]:.2f}"
        )

        for label, key, target in (
            ("  (a) lightning KD / hand KD (same work)   ", "a", "<= 1.05"),
            ("      lightning KD / hand KD (bare loop)   ", "bare", "(reference)"),
            ("      minimal LightningModule / hand KD    ", "floor", "(Lightning's floor)"),
            ("  (b) KD step / (scratch step + teacher fwd)", "b", "<= 1.10"),
        ):
            report(label, [r[0] for r in rows[key]], [r[1] for r in rows[key]], target)


if __name__ == "__main__":
    main()
