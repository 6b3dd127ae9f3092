"""DDP on 2 CPU processes (gloo), launched exactly as a user would: ``kd-lightning fit`` with
``configs/trainer/ddp.yaml``.

Checks: only the student is in DDP's gradient sync; the frozen teacher ends bit-identical
on every rank and equal to its checkpoint; the student stays identical across ranks; and the
validation metrics logged by the 2-process run (each rank sees half of the val set, metrics
synced across ranks) equal a 1-process validation of the same checkpoint on the same data.

Tolerance: accuracies/agreement are exact counts, so they must match to float precision;
ECE, KL and the loss are float sums reduced in a different order across 2 ranks, so they
agree to 1e-5 absolute. The 500-image val split divides evenly over 2 ranks, so Lightning's
DistributedSampler adds no padding duplicates.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import CONFIGS, REPO, logger_args

VAL_KEYS = (
    "val/acc", "val/ece", "val/teacher_acc", "val/teacher_ece",
    "val/agreement", "val/kl_teacher_student", "val/loss",
)
TOLERANCE = 1e-5


class DumpRankState(L.Callback):
    """Saves, on every rank, what the test compares across ranks."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.wrapper: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrapper = trainer.strategy.model  # what DDP wraps and syncs (unwrapped at teardown)
        self.wrapper = {
            "wrapper": type(wrapper).__name__,
            "synced": {n: p.numel() for n, p in wrapper.named_parameters()},
            "not_broadcast": sorted(getattr(wrapper, "parameters_to_ignore", ())),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(
            {
                "world_size": trainer.world_size,
                **self.wrapper,
                "teacher": {k: v.clone() for k, v in pl_module.teacher.state_dict().items()},
                "student": {k: v.clone() for k, v in pl_module.student.state_dict().items()},
                "heads": {k: v.clone() for k, v in pl_module.heads.state_dict().items()},
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


def _last_val_row(metrics_csv: Path) -> dict[str, float]:
    with open(metrics_csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/acc")]
    return {k: float(rows[-1][k]) for k in VAL_KEYS}


def _fit_two_ranks(out_dir: Path, teacher_ckpt: Path, *extra: str) -> list[dict]:
    """``kd-lightning fit`` of the quickstart KD config on 2 gloo processes (``extra``
    arguments last, so they override); each rank's DumpRankState."""
    ranks = out_dir / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "kd_lightning", "fit",
        "-c", str(CONFIGS / "quickstart" / "kd.yaml"), "-c", str(CONFIGS / "trainer" / "ddp.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
        "--trainer.num_sanity_val_steps=0", f"--model.teacher.checkpoint={teacher_ckpt}",
        *logger_args(out_dir / "logs", "ddp"), f"--checkpoint.dirpath={out_dir / 'ckpt'}",
        "--test_after_fit=false",
        "--trainer.callbacks+=tests.test_ddp.DumpRankState", f"--trainer.callbacks.out_dir={ranks}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [torch.load(ranks / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_cpu_processes(mnist_teacher_ckpt, tmp_path):
    ranks = _fit_two_ranks(tmp_path, mnist_teacher_ckpt)
    assert all(r["world_size"] == 2 and r["wrapper"] == "DistributedDataParallel" for r in ranks)

    # DDP syncs the student only: no teacher tensor is among its parameters
    student_numel = sum(v.numel() for k, v in ranks[0]["student"].items() if "running" not in k
                        and "num_batches" not in k)
    synced = ranks[0]["synced"]
    assert synced and all(".student." in name for name in synced), sorted(synced)
    assert sum(synced.values()) == student_numel

    # the teacher is bit-identical on every rank and to the checkpoint it was built from
    source = torch.load(mnist_teacher_ckpt, weights_only=False)["state_dict"]
    source = {k[len("model."):]: v for k, v in source.items() if k.startswith("model.")}
    for rank in ranks:
        assert rank["teacher"].keys() == source.keys()
        for k, v in source.items():
            assert torch.equal(rank["teacher"][k], v), k
    # gradient sync kept the student replicas identical
    for k, v in ranks[0]["student"].items():
        assert torch.equal(ranks[1]["student"][k], v), k

    # the checkpoint holds no teacher
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and not any("teacher" in k for k in state)

    # validation metrics of the 2-rank run == 1-process validation of the same checkpoint
    from kd_lightning.data import BundledMNISTDataModule
    from kd_lightning.modules import DistillationModule

    ddp_metrics = _last_val_row(tmp_path / "logs" / "ddp" / "version_0" / "metrics.csv")
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(
        DistillationModule.load_from_checkpoint(ckpt, weights_only=False),
        datamodule=BundledMNISTDataModule(batch_size=64, eval_batch_size=500, seed=0),
        verbose=False,
    )[0]
    diffs = {key: abs(ddp_metrics[key] - single[key]) for key in VAL_KEYS}
    print("2-rank vs 1-process val metrics, |difference|:", diffs)
    for key in VAL_KEYS:
        assert diffs[key] <= TOLERANCE, (key, ddp_metrics[key], single[key])


CRD_HEADS = """
model:
  init_args:
    heads:
      - class_path: kd_lightning.losses.CrossEntropy
        init_args: {weight: 1.0}
      - class_path: kd_lightning.losses.CRD
        init_args: {weight: 0.8, student_layers: [features], teacher_layers: [features],
                    num_samples: 5000, feat_dim: 32, nce_k: 64}
"""


@pytest.mark.slow
def test_ddp_crd_memory_bank_stays_identical_without_broadcast(mnist_teacher_ckpt, tmp_path):
    """CRD's banks hold one embedding per training sample (51 MB on CIFAR): every rank
    applies the same gathered updates and the same all-reduced Z, so DDP is told not to
    re-broadcast them from rank 0 before every step; they must stay identical anyway."""
    crd = tmp_path / "crd.yaml"
    crd.write_text(CRD_HEADS)
    ranks = _fit_two_ranks(tmp_path, mnist_teacher_ckpt, "-c", str(crd))

    buffers = ["memory_s", "memory_t", "z"]
    assert all(r["not_broadcast"] == sorted(f"heads.1.{b}" for b in buffers) for r in ranks)
    # the projection heads are trainable and synced like the student
    synced = ranks[0]["synced"]
    assert any(".heads.1.embed_s." in n for n in synced) and any(".heads.1.embed_t." in n for n in synced)

    for b in buffers:
        assert torch.equal(ranks[0]["heads"][f"1.{b}"], ranks[1]["heads"][f"1.{b}"]), b
    assert (ranks[0]["heads"]["1.z"] > 0).all()  # estimated (it starts at -1)
    for k, v in ranks[0]["student"].items():
        assert torch.equal(ranks[1]["student"][k], v), k


@pytest.mark.slow
def test_ddp_resume_mid_epoch_is_exact(mnist_teacher_ckpt, tmp_path):
    """A 2-process run stopped mid-epoch and resumed from last.ckpt (each rank skipping the
    batches it had consumed, with its own per-step RNG seed) ends bit-identical to an
    uninterrupted 2-process run."""
    run = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.deterministic=true",
           "--checkpoint.every_n_train_steps=2", "--seed_everything=7")
    reference = _fit_two_ranks(tmp_path / "reference", mnist_teacher_ckpt, *run)
    _fit_two_ranks(tmp_path / "resumed", mnist_teacher_ckpt, *run, "--trainer.max_steps=6")
    stopped = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=False)
    assert stopped["global_step"] == 6 and stopped["epoch"] == 1  # mid-epoch: 2 of 4 batches
    resumed = _fit_two_ranks(tmp_path / "resumed", mnist_teacher_ckpt, *run, "--ckpt_path=last")

    want = torch.load(tmp_path / "reference" / "ckpt" / "last.ckpt", weights_only=False)
    got = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=False)
    assert got["global_step"] == want["global_step"] == 8
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    for key, value in want["optimizer_states"][0]["state"].items():
        assert torch.equal(got["optimizer_states"][0]["state"][key]["exp_avg"], value["exp_avg"])
    for rank in (0, 1):  # and on each rank, not only rank 0's checkpoint
        for key, value in reference[rank]["student"].items():
            assert torch.equal(resumed[rank]["student"][key], value), (rank, key)
