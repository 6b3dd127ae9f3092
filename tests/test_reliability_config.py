"""Bad input: every case fails before the first training step with one ConfigError that
names the field, the bad value and the fix, and nothing saved before is lost."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.cli import main
from kd_lightning.data import BundledMNISTDataModule, CIFAR10DataModule, MNISTDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses import CrossEntropy, FitNet, KLDivergence
from kd_lightning.modules import ClassifierModule, DistillationModule, TeacherSpec
from tests.conftest import CONFIGS, DEBUG_TRAINER, REPO, logger_args
from tests.helpers.fake_data import write_cifar10

KD = str(CONFIGS / "quickstart" / "kd.yaml")


def kd(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "-c", KD, *DEBUG_TRAINER, "--test_after_fit=false",
            f"--model.teacher.checkpoint={teacher}", f"--checkpoint.dirpath={out / 'ckpt'}",
            *logger_args(out / "logs"), *extra]


def teacher_file(path: Path, model: str, num_classes: int, input_shape: tuple[int, int, int]) -> Path:
    """A ClassifierModule checkpoint as Lightning writes it (untrained weights suffice)."""
    module = ClassifierModule(model=model, num_classes=num_classes, input_shape=input_shape)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def raises(field: str, *fragments: str):
    """pytest.raises for a ConfigError on ``field`` whose message holds ``fragments``."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(ConfigError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            if not handled:  # another exception type: let it propagate as it is
                return False
            err = self.info.value
            assert err.field == field, str(err)
            for fragment in fragments:
                assert fragment in str(err), str(err)
            return handled

    return Check()


# -- names --------------------------------------------------------------------------------
def test_unknown_registered_model_suggests_closest(tmp_path, mnist_teacher_ckpt):
    with raises("model.student", "'mlp_tin'", "Closest", "mlp_tiny"):
        main(kd(mnist_teacher_ckpt, tmp_path, "--model.student=mlp_tin"))
    assert not (tmp_path / "ckpt").exists()  # failed before anything was written


def test_unknown_module_or_datamodule_class_is_one_clear_error(tmp_path, mnist_teacher_ckpt):
    with raises("model", "kd_lightning.modules.DistilationModule", "kd_lightning.modules.DistillationModule"):
        main(kd(mnist_teacher_ckpt, tmp_path, "--model=kd_lightning.modules.DistilationModule"))
    with raises("data", "BundledMNIST", "kd_lightning.data.BundledMNISTDataModule"):
        main(kd(mnist_teacher_ckpt, tmp_path, "--data=BundledMNIST"))
    with raises("model.init_args.studnt", "takes no argument 'studnt'", "student"):
        main(kd(mnist_teacher_ckpt, tmp_path, "--model.init_args.studnt=mlp"))


# -- teacher / student / data compatibility --------------------------------------------------
def test_class_counts_must_agree(tmp_path):
    teacher = teacher_file(tmp_path / "t10.ckpt", "resnet8", 10, (3, 32, 32))
    with raises("model.teacher.checkpoint", "trained for 10 classes but the data has 100"):
        DistillationModule(student="resnet8", teacher=TeacherSpec(checkpoint=str(teacher)),
                           num_classes=100, input_shape=(3, 32, 32))
    # the student's class count comes from the data; overriding it is refused
    with raises("model.student_kwargs", "num_classes"):
        DistillationModule(student="resnet8", student_kwargs={"num_classes": 5},
                           teacher=TeacherSpec(checkpoint=str(teacher)), num_classes=10,
                           input_shape=(3, 32, 32))
    # a bare state_dict of a 100-class network
    torch.save(ClassifierModule("resnet8", num_classes=100, input_shape=(3, 32, 32)).model.state_dict(),
               tmp_path / "w100.pt")
    with raises("model.teacher.weights", "do not fit", "fc.weight"):
        DistillationModule(student="resnet8", teacher=TeacherSpec(model="resnet8", weights=str(tmp_path / "w100.pt")),
                           num_classes=10, input_shape=(3, 32, 32))


def test_cifar_teacher_on_mnist_names_the_channels(tmp_path):
    teacher = teacher_file(tmp_path / "cifar.ckpt", "resnet8", 10, (3, 32, 32))
    with raises("model.teacher.checkpoint", "3-channel", "1 channel"):
        DistillationModule(student="mlp_tiny", teacher=TeacherSpec(checkpoint=str(teacher)),
                           num_classes=10, input_shape=(1, 28, 28))


def test_teacher_checkpoint_missing_corrupt_truncated_or_foreign(tmp_path, mnist_teacher_ckpt):
    def build(**spec):
        return DistillationModule(student="mlp_tiny", teacher=TeacherSpec(**spec))

    with raises("model.teacher.checkpoint", "no such file", "train the teacher first"):
        build(checkpoint=str(tmp_path / "missing.ckpt"))
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    with raises("model.teacher.checkpoint", "corrupt or truncated"):
        build(checkpoint=str(tmp_path / "random.ckpt"))
    data = mnist_teacher_ckpt.read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    with raises("model.teacher.checkpoint", "corrupt or truncated"):
        build(checkpoint=str(tmp_path / "half.ckpt"))
    with raises("model.teacher.model", "holds a 'lenet5'"):
        build(checkpoint=str(mnist_teacher_ckpt), model="mlp")
    lenet = torch.load(mnist_teacher_ckpt, weights_only=False)["state_dict"]
    torch.save({k[6:]: v for k, v in lenet.items()}, tmp_path / "lenet.pt")
    with raises("model.teacher.weights", "do not fit 'mlp'", "different architecture"):
        build(model="mlp", weights=str(tmp_path / "lenet.pt"))


def test_unknown_feature_layer_suggests_closest(mnist_teacher_ckpt):
    with raises("student_layers", "'layer9'", "Closest", "layer1"):
        DistillationModule(
            student="mlp_tiny", teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)),
            heads=[FitNet(student_layers="layer9", teacher_layers="layer3")],
        )


# -- loss and data settings ------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_temperature_must_be_positive(temperature):
    with raises("KLDivergence.temperature", str(temperature), "> 0"):
        KLDivergence(temperature=temperature)


def test_weights_negative_or_all_zero(mnist_teacher_ckpt):
    with raises("CrossEntropy.weight", "-1", ">= 0"):
        CrossEntropy(weight=-1.0)
    with raises("model.heads", "all head weights are 0"):
        DistillationModule(teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)),
                           heads=[CrossEntropy(0.0), KLDivergence(0.0)])


@pytest.mark.parametrize(("arg", "field"), [
    ("--data.batch_size=0", "data.batch_size"), ("--data.batch_size=-4", "data.batch_size"),
    ("--data.eval_batch_size=0", "data.eval_batch_size"),
    # val_fraction=0 is valid: the whole train split, no validation loop (published CIFAR protocol)
    ("--data.val_fraction=-0.1", "data.val_fraction"), ("--data.val_fraction=1.0", "data.val_fraction"),
    ("--data.val_fraction=1.5", "data.val_fraction"),
])
def test_batch_size_and_val_split_from_the_cli(tmp_path, mnist_teacher_ckpt, arg, field):
    with raises(field, "is invalid"):
        main(kd(mnist_teacher_ckpt, tmp_path, arg))


def test_data_missing_partial_or_corrupt(tmp_path, mnist_root):
    with raises("data.data_dir", "missing", "data.download=true"):
        MNISTDataModule(data_dir=str(tmp_path / "empty")).setup()
    partial = tmp_path / "partial"
    shutil.copytree(mnist_root, partial)
    (partial / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with raises("data.data_dir", "t10k-labels-idx1-ubyte", "missing"):
        MNISTDataModule(data_dir=str(partial)).setup()
    images = partial / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with raises("data.data_dir", "corrupt or truncated", "re-download"):
        MNISTDataModule(data_dir=str(partial)).setup()

    cifar = write_cifar10(tmp_path / "cifar")
    batch = cifar / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with raises("data.data_dir", "data_batch_3", "corrupt"):
        CIFAR10DataModule(data_dir=str(cifar)).setup()


# -- where the run writes ---------------------------------------------------------------------
def test_unwritable_log_or_checkpoint_dir_fails_before_training(tmp_path, mnist_teacher_ckpt):
    blocker = tmp_path / "a-file"  # a path *under a file* cannot be created, even by root
    blocker.write_text("")
    args = kd(mnist_teacher_ckpt, tmp_path)
    with raises("trainer.logger.init_args.save_dir", str(blocker / "logs"), "cannot write"):
        main([*args, f"--trainer.logger.save_dir={blocker / 'logs'}"])
    with raises("checkpoint.dirpath", str(blocker / "ckpt"), "cannot write"):
        main([*args, f"--checkpoint.dirpath={blocker / 'ckpt'}"])


def test_a_fresh_run_never_overwrites_an_earlier_runs_checkpoints(tmp_path, mnist_teacher_ckpt):
    args = kd(mnist_teacher_ckpt, tmp_path)  # kd.yaml: fixed names, version counter off
    main(args)
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "ckpt").glob("*.ckpt")}
    assert set(first) == {"best.ckpt", "last.ckpt"}
    with pytest.warns(UserWarning, match="earlier run; moved them to"):
        main(args)
    archived = list((tmp_path / "ckpt" / "previous").glob("*/*.ckpt"))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in archived} == first
    assert {p.name for p in (tmp_path / "ckpt").glob("*.ckpt")} == {"best.ckpt", "last.ckpt"}
    with raises("checkpoint.dirpath", "earlier run", "--ckpt_path=last"):
        main([*args, "--checkpoint.existing=error"])
    assert len(list((tmp_path / "ckpt").rglob("*.ckpt"))) == 4  # nothing lost either way


# -- the console -----------------------------------------------------------------------------
def test_console_prints_one_line_and_exits_2(tmp_path, mnist_teacher_ckpt):
    """A ConfigError raised inside LightningCLI's instantiation (which jsonargparse wraps in
    a ValueError) still reaches the user as one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-c", "from kd_lightning.cli import console_main; console_main()",
         *kd(mnist_teacher_ckpt, tmp_path, "--model.student=resnet_typo")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("kd-lightning: error:")] == lines[-1:]
    assert lines[-1].startswith(
        "kd-lightning: error: model.student='resnet_typo' is invalid: no model of that name"
    )


def test_bundled_data_rejects_bad_split_directly():
    with raises("data.test_fraction", "0.95"):
        BundledMNISTDataModule(val_fraction=0.1, test_fraction=0.95)
