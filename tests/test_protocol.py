"""The published CIFAR protocol: training on every image, and the three reported numbers.

``val_fraction: 0`` trains on the whole train split with no validation loop, and the kept
checkpoint is the last epoch. ``TestEveryEpoch`` writes last / best-by-val / best-on-test,
labelled, to ``results.json``; each must be the accuracy of the weights it names, so they
are compared with Lightning's own test loop on the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.callbacks import TestEveryEpoch
from kd_lightning.cli import main
from kd_lightning.data import CIFAR10DataModule, CIFAR100DataModule
from kd_lightning.data.tensor_augment import TensorAugment
from kd_lightning.errors import ConfigError
from tests.conftest import DEBUG_TRAINER

CALLBACK = '--trainer.callbacks+={"class_path": "kd_lightning.callbacks.TestEveryEpoch", ' \
           '"init_args": {"source_reports": "last"}}'


def _fit(root: Path, tmp_path: Path, val_fraction: float, epochs: int):
    return main([
        "fit", "--model=kd_lightning.modules.ClassifierModule", "--model.model=resnet8",
        "--data=kd_lightning.data.CIFAR10DataModule", f"--data.data_dir={root}",
        f"--data.val_fraction={val_fraction}", "--data.batch_size=16", "--data.eval_batch_size=25",
        *DEBUG_TRAINER, f"--trainer.max_epochs={epochs}", "--trainer.limit_test_batches=1.0",
        f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ck'}",
        "--test_after_fit=true", CALLBACK,
    ])


def _results(cli) -> dict:
    return json.loads((Path(cli.trainer.log_dir) / "results.json").read_text())


def test_val_fraction_zero_trains_on_every_image_and_reports_the_last_epoch(cifar10_root, tmp_path):
    cli = _fit(cifar10_root, tmp_path, 0.0, epochs=2)
    dm = cli.datamodule
    assert len(dm.train_set) == 300 and dm.val_set is None  # all of tests/helpers' train images
    assert dm.val_dataloader() == [] and sum(cli.trainer.num_val_batches) == 0
    assert cli.trainer.checkpoint_callback.monitor is None
    result = _results(cli)
    acc = result["accuracy"]
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert acc["last"]["epoch"] == 2 and acc["best_by_val"]["value"] is None
    assert acc["best_on_test"]["value"] == max(h["test_acc"] for h in result["history"])
    assert "optimistic" in acc["best_on_test"]["label"] and "RepDistiller" in acc["last"]["label"]
    assert result["source_reports"] == "last" and result["protocol"]["train_images"] == 300
    # test_after_fit tested the kept checkpoint = the last epoch: the same number
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(acc["last"]["value"])


def test_best_by_val_is_the_checkpoint_the_val_metric_kept(cifar10_root, tmp_path):
    cli = _fit(cifar10_root, tmp_path, 0.2, epochs=3)
    acc = _results(cli)["accuracy"]
    kept = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=False)["epoch"]
    assert acc["best_by_val"]["epoch"] == kept + 1  # checkpoints count epochs from 0
    # test_after_fit tested that checkpoint on the whole test split
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(acc["best_by_val"]["value"])


def test_summary_picks_each_number_from_the_history():
    cb = TestEveryEpoch()
    cb.history = [{"epoch": 1, "test_acc": 0.50, "val_acc": 0.60},
                  {"epoch": 2, "test_acc": 0.70, "val_acc": 0.55},
                  {"epoch": 3, "test_acc": 0.65, "val_acc": 0.60}]
    s = cb.summary()
    assert (s["last"]["value"], s["last"]["epoch"]) == (0.65, 3)
    assert (s["best_by_val"]["value"], s["best_by_val"]["epoch"]) == (0.50, 1)  # ties: earliest
    assert (s["best_on_test"]["value"], s["best_on_test"]["epoch"]) == (0.70, 2)
    restored = TestEveryEpoch()
    restored.load_state_dict(cb.state_dict())  # a resumed run keeps the measured epochs
    assert restored.summary() == s


def test_bad_protocol_values_name_the_field():
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="data.val_fraction"):
            CIFAR10DataModule(val_fraction=bad)
    with pytest.raises(ConfigError, match="source_reports"):
        TestEveryEpoch(source_reports="best")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="crop_padding_mode"):
        CIFAR10DataModule(crop_padding_mode="edge")  # type: ignore[arg-type]


def test_reference_constants_and_reflect_padding():
    # RepDistiller dataset/cifar100.py L57 = mdistiller mdistiller/dataset/cifar100.py L123
    assert CIFAR100DataModule().mean == (0.5071, 0.4867, 0.4408)
    assert CIFAR100DataModule().std == (0.2675, 0.2565, 0.2761)
    dm = CIFAR10DataModule(crop_padding_mode="reflect", mean=(0.1, 0.2, 0.3))
    assert dm.mean == (0.1, 0.2, 0.3)
    crop = dm.augmentations()[0]
    assert crop.padding == 4 and crop.padding_mode == "reflect"
    # the on-device path does the same reflect crop as torch's reflection padding
    aug = TensorAugment.from_transforms(dm.augmentations(), (0, 0, 0), (1 / 255,) * 3, (32, 32))
    assert aug.padding_mode == "reflect"
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    oy, ox, no_flip = torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5]), torch.zeros(3, dtype=torch.bool)
    out = aug._crop_flip(x, oy, ox, no_flip)
    ref = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    for i in range(3):
        assert torch.equal(out[i].float(), ref[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32])
