"""init_from_teacher: name/shape matching, every-k-th block mapping, reports and configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.cli import build_cli, main
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model
from kd_lightning.modules import DistillationModule, TeacherSpec
from kd_lightning.modules.init_from_teacher import copy_from_teacher
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _perturb_buffers(model: nn.Module) -> nn.Module:
    """Give BN running statistics non-default values, so copying them is observable."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def test_every_kth_maps_resnet56_blocks_onto_resnet20():
    torch.manual_seed(0)
    teacher = _perturb_buffers(create_model("resnet56", 10, 3))
    student = create_model("resnet20", 10, 3)
    report = copy_from_teacher(student, teacher, "every_kth")

    # 9 blocks per stage → 3: k = 3, so blocks 0, 3, 6; block 0 keeps the downsample shortcut
    assert report.block_map["layer2.1"] == "layer2.3" and report.block_map["layer3.2"] == "layer3.6"
    assert _same(student.layer2[0], teacher.layer2[0])  # includes downsample conv + BN
    assert _same(student.layer2[1], teacher.layer2[3]) and _same(student.layer3[2], teacher.layer3[6])
    assert _same(student.stem, teacher.stem) and _same(student.fc, teacher.fc)
    n_tensors = len(student.state_dict())
    assert report.copied_tensors == n_tensors and not report.skipped
    assert report.copied_params == report.total_params == sum(p.numel() for p in student.parameters())
    assert report.copied["layer1.2.bn2.running_var"] == "layer1.6.bn2.running_var"
    assert "layer1.1←layer1.3" in report.summary()


def test_matching_copies_same_names_and_fixed_k():
    torch.manual_seed(0)
    teacher = create_model("resnet56", 10, 3)
    student = create_model("resnet20", 10, 3)
    report = copy_from_teacher(student, teacher, "matching", verbose=False)
    assert _same(student.layer1[2], teacher.layer1[2]) and not report.block_map

    student = create_model("resnet20", 10, 3)
    report = copy_from_teacher(student, teacher, "every_kth", k=4, verbose=False)
    assert _same(student.layer3[2], teacher.layer3[8])
    with pytest.raises(ConfigError, match="k <= 4"):
        copy_from_teacher(create_model("resnet20", 10, 3), teacher, "every_kth", k=5)


def test_shape_mismatches_are_skipped_and_reported(mnist_teacher_ckpt):
    # the lenet5 (width 2) teacher vs a width-1 student: only the 10-way fc bias fits
    module = DistillationModule(
        student="lenet5", teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)),
        init_from_teacher="matching",
    )
    report = module.init_report
    assert list(report.copied) == ["fc.bias"] and report.copied_params == 10
    assert "shape (6, 1, 5, 5)" in report.skipped["layer1.0.weight"]
    assert "(12, 1, 5, 5)" in report.skipped["layer1.0.weight"]
    assert torch.equal(module.student.fc.bias, module.teacher.fc.bias)


def test_nothing_to_copy_or_unknown_strategy_is_a_config_error():
    teacher = create_model("lenet5", 10, 1)
    with pytest.raises(ConfigError, match="model.init_from_teacher.*no tensor of the student"):
        copy_from_teacher(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), teacher)
    with pytest.raises(ConfigError, match="model.init_from_teacher='every_other'"):
        copy_from_teacher(create_model("lenet5", 10, 1), teacher, "every_other")
    with pytest.raises(ConfigError, match="model.init_from_teacher"):
        DistillationModule(student="lenet5", teacher=TeacherSpec(model="lenet5"), init_from_teacher="bogus")


def test_mnist_config_initialises_then_checkpoint_overrides(tmp_path, mnist_teacher_ckpt):
    """The shipped MNIST config, pointed at the lenet5 test teacher with a same-shaped student:
    the student starts as an exact copy; after a fit, loading the checkpoint restores the
    trained weights, not the teacher's."""
    args = [
        "-c", str(CONFIGS / "kd" / "init_from_teacher" / "mnist.yaml"),
        f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
        "--model.student=lenet5", "--model.student_kwargs={width: 2}",
        *DEBUG_TRAINER, *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--test_after_fit=false",
    ]
    cli = build_cli(args, run=False)
    assert cli.model.init_report.copied_params == cli.model.init_report.total_params
    assert _same(cli.model.student, cli.model.teacher)

    main(["fit", *args])
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    trained = {
        k[len("student."):]: v
        for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()
        if k.startswith("student.")
    }
    loaded = DistillationModule.load_from_checkpoint(ckpt, weights_only=False)
    assert not _same(loaded.student, loaded.teacher)
    assert all(torch.equal(loaded.student.state_dict()[k], v) for k, v in trained.items())


def test_cifar_config_uses_every_kth(tmp_path, cifar10_root):
    # a randomly initialised resnet56 teacher stands in for the trained checkpoint
    override = tmp_path / "teacher.yaml"
    override.write_text("model:\n  init_args:\n    teacher: {checkpoint: null, model: resnet56}\n")
    cli = build_cli([
        "-c", str(CONFIGS / "kd" / "init_from_teacher" / "cifar_resnet.yaml"), "-c", str(override),
        f"--data.data_dir={cifar10_root}", "--data.num_workers=0", "--trainer.accelerator=cpu",
        *logger_args(tmp_path / "logs"),
    ], run=False)
    report = cli.model.init_report
    assert report.strategy == "every_kth" and report.block_map["layer1.2"] == "layer1.6"
    assert report.copied_params == report.total_params
