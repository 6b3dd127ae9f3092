"""Shared fixtures: CPU only, no network, tmp log dirs, tiny data in real formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# No test may reach a network or a GPU.
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Test models are tiny: one intra-op thread is faster than two, and two OpenMP threads
# spinning against another process on a 2-core machine slow small steps down ~10×.
os.environ["OMP_NUM_THREADS"] = "1"

torch.set_num_threads(1)

from tests.helpers.fake_data import write_cifar10, write_cifar100, write_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: appended to CLI calls in tests: CPU, a couple of batches, no progress bars
DEBUG_TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own working directory, so relative run dirs never collide, and
    with no rendezvous address left over from another test on this worker (Lightning's
    SLURMEnvironment writes MASTER_ADDR into os.environ; a stale one hangs gloo for 30 min)."""
    monkeypatch.chdir(tmp_path)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    yield


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar100"))


def logger_args(save_dir: Path, name: str = "test") -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={save_dir}",
        f"--trainer.logger.name={name}",
    ]


@pytest.fixture(scope="session")
def mnist_teacher_ckpt(tmp_path_factory) -> Path:
    """A small LeNet teacher trained briefly on the bundled MNIST; shared by KD tests."""
    from kd_lightning.cli import main

    out = tmp_path_factory.mktemp("teacher")
    main([
        "fit", "-c", str(CONFIGS / "quickstart" / "teacher.yaml"), *DEBUG_TRAINER,
        "--trainer.limit_train_batches=20", *logger_args(out / "logs"),
        f"--checkpoint.dirpath={out}", "--test_after_fit=false",
    ])
    return out / "best.ckpt"


@pytest.fixture(scope="session")
def cifar_teacher_ckpt(tmp_path_factory, cifar10_root) -> Path:
    """A resnet20 ClassifierModule checkpoint on the fake CIFAR-10 files."""
    from kd_lightning.cli import main

    out = tmp_path_factory.mktemp("cifar_teacher")
    main([
        "fit", "--model=kd_lightning.modules.ClassifierModule", "--model.model=resnet20",
        "--data=kd_lightning.data.CIFAR10DataModule", f"--data.data_dir={cifar10_root}",
        "--data.batch_size=16", *DEBUG_TRAINER, *logger_args(out / "logs"),
        f"--checkpoint.dirpath={out}", "--checkpoint.filename=best",
    ])
    return out / "best.ckpt"
