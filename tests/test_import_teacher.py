"""``kd-lightning import-teacher`` on files in RepDistiller's and mdistiller's own layouts.

The test writes the files itself: the key names, order and shapes of RepDistiller's
``models/resnet.py`` (``resnet8x4``: ``conv1``/``bn1`` stem, ``layerN.B.{conv,bn}{1,2}``,
``downsample.{0,1}``, ``fc``), in the dict RepDistiller's ``train_teacher.py`` saves
(``{"epoch", "model", "accuracy", "optimizer"}``), written out from the reference, not from
our model.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from kd_lightning.import_teacher import import_teacher
from kd_lightning.modules.teacher import fingerprint
from tests.conftest import DEBUG_TRAINER


def _bn(prefix: str, c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.rand(c, generator=gen) + 0.5,
            f"{prefix}.bias": torch.randn(c, generator=gen) * 0.1,
            f"{prefix}.running_mean": torch.randn(c, generator=gen) * 0.1,
            f"{prefix}.running_var": torch.rand(c, generator=gen) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(100)}


def repdistiller_resnet8x4(num_classes: int = 100) -> OrderedDict[str, torch.Tensor]:
    """RepDistiller ``resnet8x4`` state dict: widths 32/64/128/256, one BasicBlock a stage."""
    gen = torch.Generator().manual_seed(0)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["conv1.weight"] = torch.randn(32, 3, 3, 3, generator=gen) * 0.1
    sd.update(_bn("bn1", 32, gen))
    cin = 32
    for i, c in enumerate((64, 128, 256), start=1):
        p = f"layer{i}.0"
        sd[f"{p}.conv1.weight"] = torch.randn(c, cin, 3, 3, generator=gen) * 0.05
        sd.update(_bn(f"{p}.bn1", c, gen))
        sd[f"{p}.conv2.weight"] = torch.randn(c, c, 3, 3, generator=gen) * 0.05
        sd.update(_bn(f"{p}.bn2", c, gen))
        sd[f"{p}.downsample.0.weight"] = torch.randn(c, cin, 1, 1, generator=gen) * 0.1
        sd.update(_bn(f"{p}.downsample.1", c, gen))
        cin = c
    sd["fc.weight"] = torch.randn(num_classes, 256, generator=gen) * 0.05
    sd["fc.bias"] = torch.randn(num_classes, generator=gen) * 0.05
    return sd


@pytest.fixture
def repdistiller_file(tmp_path: Path) -> tuple[Path, OrderedDict]:
    sd = repdistiller_resnet8x4()
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": sd, "accuracy": 79.42, "optimizer": {}}, path)
    return path, sd


def test_repdistiller_file_becomes_a_teacher_that_distils(repdistiller_file, cifar100_root, tmp_path):
    path, sd = repdistiller_file
    out = main(["import-teacher", "--format", "repdistiller", str(path), "--model", "resnet8x4",
                "-o", str(tmp_path / "t.ckpt")])
    ckpt = torch.load(out, weights_only=False)
    assert ckpt["hyper_parameters"]["model"] == "resnet8x4"
    # as LightningCLI saves it: `kd-lightning test --ckpt_path` (the experiment's reused
    # teacher) rebuilds the module from these
    assert ckpt["hyper_parameters"]["_class_path"] == "kd_lightning.modules.ClassifierModule"
    assert ckpt["hyper_parameters"]["num_classes"] == 100
    assert ckpt["kd_imported_from"]["reported_accuracy"] == 79.42
    state = ckpt["state_dict"]
    # their names → ours, value for value
    for theirs, ours in (("conv1.weight", "stem.0.weight"), ("bn1.running_var", "stem.1.running_var"),
                         ("layer2.0.downsample.0.weight", "layer2.0.downsample.0.weight"),
                         ("layer3.0.bn2.bias", "layer3.0.bn2.bias"), ("fc.weight", "fc.weight")):
        assert torch.equal(state[f"model.{ours}"], sd[theirs]), theirs
    assert len([k for k in state if k.startswith("model.")]) == len(sd)

    # the imported file is a working teacher: a KD run loads exactly these weights
    cli = main([
        "fit", "--model=kd_lightning.modules.DistillationModule", "--model.student=resnet8",
        f"--model.teacher={{\"checkpoint\": \"{out}\"}}",
        "--data=kd_lightning.data.CIFAR100DataModule", f"--data.data_dir={cifar100_root}",
        "--data.batch_size=8", "--data.val_fraction=0.25", *DEBUG_TRAINER,
        f"--checkpoint.dirpath={tmp_path / 'kd'}",
    ])
    # the teacher's BatchNorms are folded at build time; its fingerprint, taken before, is the file's
    imported = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    assert cli.model.teacher_fingerprints[0] == fingerprint(SimpleNamespace(state_dict=lambda: imported))
    assert "val/teacher_acc" in cli.trainer.callback_metrics


def test_mdistiller_distiller_checkpoint_takes_the_student(tmp_path):
    sd = repdistiller_resnet8x4()
    wrapped = {f"module.student.{k}": v for k, v in sd.items()}
    wrapped.update({"module.teacher.conv1.weight": torch.zeros(1)})
    path = tmp_path / "student_best"
    torch.save({"model": wrapped, "epoch": 240, "best_acc": 76.3}, path)
    ckpt = import_teacher(path, "mdistiller", "resnet8x4")
    assert torch.equal(ckpt["state_dict"]["model.fc.bias"], sd["fc.bias"])
    assert ckpt["kd_imported_from"]["reported_accuracy"] == 76.3


def test_errors_name_the_field_and_the_tensor(repdistiller_file, tmp_path):
    path, _ = repdistiller_file
    with pytest.raises(ConfigError, match=r"'conv1.weight' \(32, 3, 3, 3\) vs resnet20's 'stem.0.weight'"):
        import_teacher(path, "repdistiller", "resnet20")
    cut = repdistiller_resnet8x4()
    del cut["fc.weight"], cut["fc.bias"]
    torch.save({"model": cut}, tmp_path / "cut.pth")
    with pytest.raises(ConfigError, match="holds 60 tensors, resnet8x4 has 62.*'fc.weight'"):
        import_teacher(tmp_path / "cut.pth", "repdistiller", "resnet8x4", num_classes=100)
    with pytest.raises(ConfigError, match="--format"):
        import_teacher(path, "timm", "resnet8x4")
    with pytest.raises(ConfigError, match="no such file"):
        import_teacher(tmp_path / "missing.pth", "repdistiller", "resnet8x4")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        import_teacher(tmp_path / "junk.pth", "repdistiller", "resnet8x4")
