"""The DataModules read the real on-disk formats (IDX, CIFAR pickles) and split correctly."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data import (
    BundledMNISTDataModule,
    CIFAR10DataModule,
    MNISTDataModule,
)
from kd_lightning.errors import ConfigError


def test_bundled_mnist_split_is_stratified_seeded_and_disjoint():
    dm = BundledMNISTDataModule(seed=0)
    dm.setup()
    sizes = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert sizes == (3500, 500, 1000)
    for split, per_class in (("train", 350), ("val", 50), ("test", 100)):
        assert dm.class_counts(split).tolist() == [per_class] * 10
    idx = [set(getattr(dm, f"{s}_set").indices.tolist()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    again = BundledMNISTDataModule(seed=0)
    again.setup()
    assert torch.equal(again.val_set.indices, dm.val_set.indices)
    other = BundledMNISTDataModule(seed=1)
    other.setup()
    assert not torch.equal(other.val_set.indices, dm.val_set.indices)


def test_bundled_mnist_batches_have_mnist_shape_and_normalisation():
    dm = BundledMNISTDataModule(batch_size=32)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 1, 28, 28)
    assert batch["label"].dtype == torch.long and batch["index"].shape == (32,)
    x = dm.test_set.normalised()
    # real digits normalised with MNIST's constants: mean ≈ 0, std ≈ 1
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1


def test_mnist_datamodule_reads_idx_files(mnist_root):
    dm = MNISTDataModule(data_dir=str(mnist_root), batch_size=16, val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 300 and len(dm.test_set) == 100
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (16, 1, 28, 28)
    # the fixture's pixels encode the label as a bright band: check the read is not scrambled
    raw = dm.val_set.images[dm.val_set.indices[0], :, :, 0].float()
    band_row = int(raw.mean(1).argmax())
    assert band_row // 2 == int(dm.val_set.labels[dm.val_set.indices[0]]) * 28 // 10 // 2


def test_cifar10_reads_pickle_batches_and_augments_train_only(cifar10_root):
    dm = CIFAR10DataModule(data_dir=str(cifar10_root), batch_size=8)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 300 and len(dm.test_set) == 100
    assert dm.train_set.transform is not None and dm.val_set.transform is None
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert names[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert dm.train_set.transform.transforms[0].padding == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32)
    # the same sample twice through the train transform differs (random crop/flip)
    torch.manual_seed(0)
    a, b = dm.train_set[0]["image"], dm.train_set[0]["image"]
    assert a.shape == b.shape == (3, 32, 32)
    assert dm.val_set[0]["image"].equal(dm.val_set[0]["image"])


def test_missing_data_without_download_says_how_to_get_it(tmp_path):
    for dm in (MNISTDataModule(data_dir=str(tmp_path)), CIFAR10DataModule(data_dir=str(tmp_path))):
        with pytest.raises(ConfigError, match="download=true") as err:
            dm.setup()
        assert err.value.field == "data.data_dir"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"batch_size": 0}, "data.batch_size"), ({"val_fraction": 1.0}, "data.val_fraction"),
     ({"val_fraction": -0.1}, "data.val_fraction")],
)
def test_bad_loader_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        BundledMNISTDataModule(**kwargs)
    assert err.value.field == field
