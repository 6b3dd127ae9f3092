"""Every head config under configs/kd/ runs a fast debug fit through the real CLI and logs
``train/loss_<head>``: the MNIST ones on top of the quickstart (bundled MNIST), the
CIFAR ones on generated CIFAR-10 files with a resnet20 teacher and a resnet8 student."""

from __future__ import annotations

import csv
import math
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

import kd_lightning.data.mnist as mnist
from kd_lightning import losses
from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args

KD = CONFIGS / "kd"
#: the head configs of configs/kd/ (other configs there are whole runs, tested elsewhere)
MNIST_HEADS = ["kd", "ce", "mse", "pseudo_label", "dkd", "fitnet", "at", "nst", "sp", "rkd", "pkt", "crd",
               # issue #14: the modern method set
               "kd_ls", "dkd_ls", "dist", "ctkd", "mlkd", "mlkd_ls", "wttm", "kd_dot",
               "reviewkd", "ofd", "vid", "kdsvd", "ab", "ft", "fsp", "cc"]
CIFAR_HEADS = sorted(p.stem for p in (KD / "cifar").glob("*.yaml"))
#: on top of DEBUG_TRAINER: one small validation batch is enough to see val metrics
FAST = ["--trainer.limit_val_batches=1"]
#: checkpoint keys that prove a head's adapters/buffers are saved with the student
ADAPTER_KEYS = {
    "fitnet": "connectors", "crd": "memory_s", "ctkd": "theta", "reviewkd": "abfs",
    "ofd": "neg_sum", "vid": "log_scale", "ab": "connectors", "ft": "paraphraser", "cc": "embed_t",
}


_load_bundled_once = cache(mnist.load_bundled_mnist)


@pytest.fixture(autouse=True)
def _bundled_mnist_once(monkeypatch):
    """Parse the bundled MNIST CSV once per session, not once per fit (~2 s each)."""
    monkeypatch.setattr(mnist, "load_bundled_mnist", _load_bundled_once)


def _head_names(config: Path) -> list[str]:
    heads = yaml.safe_load(config.read_text())["model"]["init_args"]["heads"]
    names = []
    for head in heads:
        cls = head["class_path"].rsplit(".", 1)[1]
        given = (head.get("init_args") or {}).get("name")
        names.append(given or getattr(losses, cls).default_name)
    return names


def _logged(save_dir: Path) -> dict[str, list[float]]:
    (metrics,) = save_dir.rglob("metrics.csv")
    with open(metrics) as fh:
        rows = list(csv.DictReader(fh))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


def _check_fit(tmp_path: Path, config: Path) -> None:
    logged = _logged(tmp_path / "logs")
    for name in _head_names(config):
        values = logged.get(f"train/loss_{name}")
        assert values and all(math.isfinite(v) for v in values), (name, sorted(logged))
    assert logged["val/acc"]
    adapter = ADAPTER_KEYS.get(config.stem)
    if adapter:
        state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
        assert any(k.startswith("heads.") and adapter in k for k in state), sorted(state)[:20]


@pytest.mark.parametrize("head", MNIST_HEADS)
def test_mnist_head_config_fits(head, mnist_teacher_ckpt, tmp_path):
    config = KD / f"{head}.yaml"
    main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), "-c", str(config), *DEBUG_TRAINER,
        f"--model.init_args.teacher.checkpoint={mnist_teacher_ckpt}",
        "--data.init_args.batch_size=32", "--data.init_args.eval_batch_size=64", *FAST,
        *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--test_after_fit=false",
    ])
    _check_fit(tmp_path, config)


@pytest.mark.parametrize("head", CIFAR_HEADS)
def test_cifar_head_config_fits(head, cifar_teacher_ckpt, cifar10_root, tmp_path):
    config = KD / "cifar" / f"{head}.yaml"
    main([
        "fit", "-c", str(CONFIGS / "data" / "cifar10.yaml"),
        "--model=kd_lightning.modules.DistillationModule", "-c", str(config), *DEBUG_TRAINER,
        "--model.init_args.student=resnet8",
        f"--model.init_args.teacher.checkpoint={cifar_teacher_ckpt}",
        f"--data.init_args.data_dir={cifar10_root}", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=16", *FAST,
        *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ])
    _check_fit(tmp_path, config)


def test_feature_head_without_layers_fails_before_training(mnist_teacher_ckpt, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"init_args": {"heads": [
        {"class_path": "kd_lightning.losses.FitNet", "init_args": {"weight": 100.0}},
    ]}}}))
    with pytest.raises(ConfigError, match="FitNet.student_layers"):
        main([
            "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), "-c", str(bad), *DEBUG_TRAINER,
            f"--model.init_args.teacher.checkpoint={mnist_teacher_ckpt}",
            *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        ])
    assert not (tmp_path / "ckpt").exists()  # nothing ran


def test_new_head_is_one_file_plus_one_yaml(mnist_teacher_ckpt, tmp_path, monkeypatch):
    """The README's worked example ("How to add a new head"), verbatim, from outside the package."""
    doc = (CONFIGS.parent / "README.md").read_text()
    section = doc.split("## Add a loss head")[1]
    code = section.split('```python title="my_heads.py"\n')[1].split("```")[0]
    config = section.split('```yaml title="cos.yaml"\n')[1].split("```")[0]
    (tmp_path / "my_heads.py").write_text(code)
    (tmp_path / "cos.yaml").write_text(config)
    monkeypatch.syspath_prepend(str(tmp_path))
    main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), "-c", str(tmp_path / "cos.yaml"),
        *DEBUG_TRAINER, *FAST, f"--model.init_args.teacher.checkpoint={mnist_teacher_ckpt}",
        "--data.init_args.batch_size=32", "--data.init_args.eval_batch_size=64",
        *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--test_after_fit=false",
    ])
    logged = _logged(tmp_path / "logs")
    assert logged["train/loss_cos"] and all(math.isfinite(v) for v in logged["train/loss_cos"])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert "heads.1.proj.weight" in state
