"""kd-lightning against torchdistill 1.1.5 on the same KD work (issue 25).

resnet56 → resnet20 (CIFAR shapes, 100 classes), Hinton KD at T = 4 (0.1·CE + 0.9·KL·T²),
SGD (lr 0.05, momentum 0.9, wd 5e-4), batch 64, the same in-memory batches, the same
``nn.Module`` networks (kd-lightning's zoo definitions, the teacher's BatchNorm statistics
calibrated on a batch and saved once, so both frameworks load the same teacher). Each run is
one process; rounds are interleaved (every round runs every setting once, in a rotated
order) so machine-load drift hits all settings alike. A run times ``--steps`` training
steps after ``--warmup`` untimed ones:

* ``torchdistill``: a ``DistillationBox`` (``forward_process`` + ``post_forward_process``,
  its default backward/step) with ``KDLoss`` (alpha 0.9, T 4), teacher frozen
  (``requires_grad: false``), fp32 — torchdistill's own usage.
* ``kdl_defaults``: ``Trainer.fit`` of a ``DistillationModule`` with every default
  (``Performance()``: BatchNorm folding, channels_last ``auto``, ``teacher_precision`` at
  its default), ``precision: 32-true``.
* ``kdl_fp32_fold``: the same, fp32 with folding only (channels_last off, teacher fp32):
  the numeric regime of torchdistill.
* ``kdl_bf16``: the defaults with the trainer at ``bf16-mixed``
  (``configs/trainer/cpu_bf16.yaml``).

Reported: per round each setting's median s/step, and each kd-lightning setting's ratio to
torchdistill (median over rounds of the per-round ratios; < 1 is faster).

    pip install -e ".[bench]" -c constraints.txt
    python -m benchmarks.peer_torchdistill --out docs/results/peer_torchdistill_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SETTINGS = ("torchdistill", "kdl_defaults", "kdl_fp32_fold", "kdl_bf16")
CLASSES = 100


def _batches(n: int, batch: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(batch, 3, 32, 32, generator=g).to(device),
            "label": torch.randint(0, CLASSES, (batch,), generator=g).to(device),
            "index": torch.arange(i * batch, (i + 1) * batch, device=device),
            "view": torch.zeros(batch, dtype=torch.long, device=device),
        }
        for i in range(n)
    ]


def make_teacher_weights(path: str) -> None:
    """resnet56 with BatchNorm statistics from a batch (a trained network's numerics, not
    the mean-0/var-1 of a fresh one), saved as a state_dict both frameworks load."""
    from benchmarks.teacher_store import calibrate_bn
    from kd_lightning.models import model_from_config

    torch.manual_seed(0)
    teacher = model_from_config("resnet56", CLASSES, {"in_channels": 3}, "teacher", None)
    with torch.no_grad():
        calibrate_bn(teacher, [torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    torch.save(teacher.state_dict(), path)


def _torchdistill_step_fn(weights: str, device: str):
    import logging

    from torchdistill.core.distillation import get_distillation_box

    from kd_lightning.models import model_from_config

    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    torch.manual_seed(0)
    teacher = model_from_config("resnet56", CLASSES, {"in_channels": 3}, "teacher", None)
    teacher.load_state_dict(torch.load(weights))
    student = model_from_config("resnet20", CLASSES, {"in_channels": 3}, "student", None)
    data = torch.utils.data.TensorDataset(torch.zeros(64, 3, 32, 32), torch.zeros(64, dtype=torch.long))
    config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": 64, "num_workers": 0}},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "wrapper": "DataParallel",
                    "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [],
                    "wrapper": "DataParallel", "requires_grad": True, "frozen_modules": []},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": 4.0, "alpha": 0.9, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    box = get_distillation_box(teacher.to(device), student.to(device), {"train": data}, config,
                               torch.device(device), [], False, 1.0)
    box.pre_epoch_process(epoch=0)

    def step(batch: dict) -> None:
        loss = box.forward_process(batch["image"], batch["label"], supp_dict={})
        box.post_forward_process(loss)

    return step


def _kdl_fit(setting: str, weights: str, device: str, batches: list[dict], warmup: int) -> list[float]:
    import lightning as L

    from benchmarks._common import Batches, quiet_trainer, sgd
    from kd_lightning.losses import CrossEntropy, KLDivergence
    from kd_lightning.modules import DistillationModule
    from kd_lightning.modules.performance import Performance
    from kd_lightning.modules.teacher import TeacherSpec

    performance = Performance(channels_last=False, teacher_precision="fp32") if setting == "kdl_fp32_fold" else Performance()
    torch.manual_seed(0)
    module = DistillationModule(
        student="resnet20", teacher=TeacherSpec(model="resnet56", weights=weights),
        num_classes=CLASSES, input_shape=(3, 32, 32),
        heads=[CrossEntropy(0.1), KLDivergence(0.9, temperature=4.0)],
        performance=performance, optimizer=sgd,
    )
    module.configure_optimizers = lambda: sgd(module.student.parameters())
    module.log_train_step = lambda *a, **k: None  # logging off, as torchdistill logs nothing per step
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, *args, **kwargs) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer = quiet_trainer(
        accelerator="gpu" if device == "cuda" else "cpu", max_steps=len(batches),
        precision="bf16-mixed" if setting == "kdl_bf16" else "32-true", callbacks=[Stamp()],
    )
    trainer.fit(module, train_dataloaders=Batches(batches))
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    batches = _batches(args.warmup + args.steps + 1, args.batch, args.device)
    if args.worker == "torchdistill":
        step = _torchdistill_step_fn(args.weights, args.device)
        times = []
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            step(b)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i > args.warmup:  # the same steps kd-lightning's stamps cover
                times.append(time.perf_counter() - t0)
    else:
        times = _kdl_fit(args.worker, args.weights, args.device, batches, args.warmup)
    print("RESULT " + json.dumps({"setting": args.worker, "s_per_step": times}), flush=True)


def run_rounds(args: argparse.Namespace, settings: list[str]) -> dict:
    from kd_lightning.machine import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "resnet56.pt")
        make_teacher_weights(weights)
        rounds: list[dict[str, float]] = []
        for r in range(args.rounds):
            order = settings[r % len(settings):] + settings[: r % len(settings)]
            medians: dict[str, float] = {}
            for name in order:
                cmd = [sys.executable, "-m", "benchmarks.peer_torchdistill", "--worker", name,
                       "--weights", weights, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
                medians[name] = statistics.median(json.loads(line[len("RESULT "):])["s_per_step"])
                print(f"round {r} {name}: {medians[name]:.4f} s/step", flush=True)
            rounds.append(medians)
    result = {
        "machine": machine_info(), "device": args.device, "threads": args.threads, "batch": args.batch,
        "steps_per_run": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
        "pair": "resnet56 -> resnet20, CIFAR shapes, 100 classes, KD T=4 (0.1 CE + 0.9 KL)",
        "peer": "torchdistill 1.1.5 DistillationBox + KDLoss",
        "s_per_step_median": {n: round(statistics.median(r[n] for r in rounds), 4) for n in settings},
        "s_per_step_rounds": {n: [round(r[n], 4) for r in rounds] for n in settings},
    }
    if "torchdistill" in settings:
        result["ratio_to_torchdistill"] = {
            n: round(statistics.median(r[n] / r["torchdistill"] for r in rounds), 3)
            for n in settings if n != "torchdistill"
        }
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    from benchmarks._common import write_result

    args = parser().parse_args()
    if args.worker:
        worker(args)
        return
    write_result(run_rounds(args, args.settings), args.out)


if __name__ == "__main__":
    main()
