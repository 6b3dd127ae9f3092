"""ImageFolderDataModule on tiny JPEG trees written by the test, and the ImageNet configs.

Offline end to end: teacher → scratch → KD through ``kd-lightning fit``; the two data paths
(PIL in workers, decode on the training device) give the same batches; bad trees fail with
one line naming the folder or file; every ImageNet repro config parses and trains 2 steps
on 224-pixel crops with teachers built without weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.cli import main
from kd_lightning.data.imagefolder import ImageFolderDataModule
from kd_lightning.errors import ConfigError
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args
from tests.helpers.jpeg_tree import write_jpeg_tree

SMALL = ["--data.init_args.image_size=32", "--data.init_args.resize_size=36",
         "--data.init_args.batch_size=4", "--data.init_args.num_workers=0"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_jpeg_tree(tmp_path_factory.mktemp("jpegs"), classes=3, per_class=4)


def _dm(root: Path, **kw) -> ImageFolderDataModule:
    args = dict(batch_size=4, num_workers=0, image_size=32, resize_size=36)
    return ImageFolderDataModule(str(root), **{**args, **kw})


def test_teacher_scratch_and_kd_on_a_jpeg_tree_offline(tree, tmp_path):
    data = ["--data=kd_lightning.data.ImageFolderDataModule", f"--data.init_args.data_dir={tree}", *SMALL]
    run = [*DEBUG_TRAINER, "--test_after_fit=false"]
    main(["fit", "--model=kd_lightning.modules.ClassifierModule", "--model.model=resnet8", *data, *run,
          *logger_args(tmp_path / "logs", "teacher"), f"--checkpoint.dirpath={tmp_path / 't'}",
          "--checkpoint.filename=best"])
    teacher = tmp_path / "t" / "best.ckpt"
    assert teacher.is_file()
    main(["fit", "--model=kd_lightning.modules.ClassifierModule", "--model.model=resnet8", *data, *run,
          *logger_args(tmp_path / "logs", "scratch"), f"--checkpoint.dirpath={tmp_path / 's'}"])
    cli = main(["fit", "--model=kd_lightning.modules.DistillationModule", "--model.student=resnet8",
                f"--model.teacher.checkpoint={teacher}", *data, "--data.init_args.augment_views=2", *run,
                *logger_args(tmp_path / "logs", "kd"), f"--checkpoint.dirpath={tmp_path / 'kd'}"])
    assert cli.trainer.global_step == 2
    assert cli.model.num_classes == 3 and tuple(cli.model.input_shape) == (3, 32, 32)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_pil_and_on_device_paths_agree_and_views_repeat(tree):
    batches = []
    for on_device in (False, True):
        dm = _dm(tree, augment_views=2, augment_on_device=on_device)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert isinstance(batch["image"], list) == on_device  # encoded bytes until on the device
        batches.append(dm.on_after_batch_transfer(batch, 0))
    pil, device = batches
    assert torch.equal(pil["index"], device["index"]) and torch.equal(pil["view"], device["view"])
    assert pil["image"].shape == (4, 3, 32, 32)
    # the same decoder (libjpeg) and the same crop parameters: the same pixels
    assert torch.allclose(pil["image"], device["image"], atol=1e-5)
    # a view is a function of (seed, index, view); fresh random crops are not
    ds = _dm(tree, augment_views=2).train_set or _setup(_dm(tree, augment_views=2))
    assert torch.equal(ds[3, 1]["image"], ds[3, 1]["image"])
    assert not torch.equal(ds[3, 0]["image"], ds[3, 1]["image"])
    rnd = _setup(_dm(tree))
    assert rnd[3]["view"] == -1 and _setup(_dm(tree)).augmented


def _setup(dm: ImageFolderDataModule):
    dm.setup("fit")
    return dm.train_set


def test_standard_imagenet_transforms_and_held_out_val(tree):
    dm = ImageFolderDataModule(str(tree), val_dir=None, val_fraction=0.25, num_workers=0, batch_size=2)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.input_shape == (3, 224, 224)
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3  # stratified: 1 image per class held out
    assert not set(dm.train_set.indices.tolist()) & set(dm.val_set.indices.tolist())
    assert dm.test_set is dm.val_set
    x = dm.val_set[0]["image"]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 3  # normalised with ImageNet mean/std
    assert dm.augments_randomly and not _dm(tree, augment_views=1).augments_randomly


def test_bad_trees_fail_with_one_line(tmp_path):
    root = write_jpeg_tree(tmp_path / "a", classes=2, per_class=2)
    (root / "train" / "class_empty").mkdir()
    (root / "val" / "class_empty").mkdir()
    with pytest.raises(ConfigError, match="class_empty.*holds no images"):
        _dm(root).setup("fit")

    root = write_jpeg_tree(tmp_path / "b", classes=2, per_class=2)
    (root / "val" / "class_1").rename(root / "val" / "class_x")
    with pytest.raises(ConfigError, match="data.val_dir.*differ.*only in train: \\['class_1'\\]"):
        _dm(root).setup("fit")

    root = write_jpeg_tree(tmp_path / "c", classes=2, per_class=2)
    bad = root / "train" / "class_0" / "img_1.JPEG"
    bad.write_bytes(b"\xff\xd8 truncated")
    for on_device in (False, True):
        dm = _dm(root, augment_on_device=on_device, batch_size=4)
        dm.setup("fit")
        with pytest.raises(ConfigError, match="img_1.JPEG.*not a readable image"):
            for batch in dm.train_dataloader():
                dm.on_after_batch_transfer(batch, 0)
    with pytest.raises(ConfigError, match="no such folder"):
        ImageFolderDataModule(str(tmp_path / "missing"))


# -- the ImageNet repro configs -------------------------------------------------------------------
IMAGENET = sorted((CONFIGS / "repro" / "imagenet").glob("*/*.yaml"))

def test_imagenet_configs_exist():
    names = {f"{p.parent.name}/{p.stem}" for p in IMAGENET}
    for pair in ("resnet34_resnet18", "resnet50_mobilenetv1"):
        for method in ("kd", "dkd", "crd", "reviewkd", "dist", "kd_dot"):
            assert f"{pair}/{method}" in names


@pytest.mark.parametrize("cfg", IMAGENET, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_imagenet_config_parses(cfg, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", str(cfg), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 100 and printed["data"]["init_args"]["image_size"] == 224
    assert printed["model"]["init_args"]["lr_scheduler"]["init_args"]["milestones"] == [30, 60, 90]


# ~15 s each on a shared 2-core CPU (ResNet-34/50 teachers at 224 px): slow, CI runs them
@pytest.mark.slow
@pytest.mark.parametrize("cfg", IMAGENET, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_imagenet_config_trains_two_steps(cfg, tree, tmp_path):
    config = yaml.safe_load(cfg.read_text())
    for head in config["model"]["init_args"]["heads"]:
        if head["class_path"].endswith(".CRD"):  # the 1.28M-sample bank: sized from the tree instead
            head["init_args"].update(num_samples=None, nce_k=4)
    teacher = config["model"]["init_args"]["teacher"]
    teacher.pop("model_kwargs")  # no weights offline: built untrained, which must be allowed
    teacher["allow_untrained"] = True
    small = tmp_path / cfg.name
    small.write_text(yaml.safe_dump(config))
    cli = main([
        "fit", "-c", str(small), *DEBUG_TRAINER, "--trainer.strategy=auto", "--trainer.precision=32-true",
        "--trainer.benchmark=false", "--trainer.limit_val_batches=0", "--test_after_fit=false",
        f"--data.init_args.data_dir={tree}", "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false",
        *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ])
    assert cli.trainer.global_step == 2
    assert tuple(cli.model.input_shape) == (3, 224, 224)


def test_data_configs_name_the_new_datamodules():
    for name in ("imagenet", "imagefolder", "streaming"):
        data = yaml.safe_load((CONFIGS / "data" / f"{name}.yaml").read_text())["data"]
        assert data["class_path"].rpartition(".")[2] in ("ImageFolderDataModule", "StreamingImageDataModule")
