"""CIFAR-100 and Fashion-MNIST DataModules read their real on-disk formats correctly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import CIFAR100DataModule, FashionMNISTDataModule
from kd_lightning.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from kd_lightning.errors import ConfigError
from tests.helpers.fake_data import write_cifar10, write_mnist


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("fashion"), folder="FashionMNIST")


def _cifar100_file(root: Path, name: str) -> dict:
    with open(root / "cifar-100-python" / name, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def test_cifar100_reads_fine_labels_and_pixel_planes(cifar100_root):
    # 400 train images = 4 per class, so 0.25 holds out exactly one per class
    dm = CIFAR100DataModule(data_dir=str(cifar100_root), batch_size=8, val_fraction=0.25)
    assert (dm.num_classes, dm.input_shape) == (100, (3, 32, 32))
    assert (dm.mean, dm.std) == (CIFAR100_MEAN, CIFAR100_STD)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (300, 100, 200)
    assert dm.class_counts("val").tolist() == [1] * 100
    assert dm.class_counts("train").tolist() == [3] * 100
    assert not set(dm.train_set.indices.tolist()) & set(dm.val_set.indices.tolist())

    test = _cifar100_file(cifar100_root, "test")
    # the fine (100-way) labels, not the coarse (20-way) ones stored next to them
    assert dm.test_set.labels.tolist() == test["fine_labels"]
    assert dm.test_set.labels.tolist() != test["coarse_labels"]
    # rows are stored as R, G and B planes of 32×32: the channels must come back in place
    rows = np.asarray(test["data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(rows) - mean) / std
    torch.testing.assert_close(dm.test_set.normalised(), expected, atol=1e-5, rtol=0)

    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and 0 <= int(batch["label"].min())
    assert int(batch["label"].max()) < 100
    assert batch["index"].tolist() == list(range(8))


def test_cifar100_augments_only_the_training_split(cifar100_root):
    dm = CIFAR100DataModule(data_dir=str(cifar100_root), batch_size=16, val_fraction=0.25, seed=3)
    dm.setup()
    assert dm.train_set.transform is not None and dm.val_set.transform is None
    torch.manual_seed(0)
    first = next(iter(dm.train_dataloader()))
    assert first["image"].shape == (16, 3, 32, 32)
    # crops and flips: the same images drawn twice almost surely differ somewhere
    again = torch.stack([dm.train_set[int(i)]["image"] for i in range(4)])
    twice = torch.stack([dm.train_set[int(i)]["image"] for i in range(4)])
    assert not torch.equal(again, twice)
    plain = CIFAR100DataModule(data_dir=str(cifar100_root), val_fraction=0.25, augment=False)
    plain.setup()
    assert plain.train_set.transform is None


def test_cifar100_errors_name_the_data_dir_and_the_fix(tmp_path, cifar100_root):
    # CIFAR-10 files where CIFAR-100 is expected: the error says what is missing and how to fix it
    cifar10 = write_cifar10(tmp_path / "c10")
    with pytest.raises(ConfigError) as info:
        CIFAR100DataModule(data_dir=str(cifar10)).setup()
    assert info.value.field == "data.data_dir"
    assert "cifar-100-python" in str(info.value) and "download=true" in str(info.value)

    # a truncated pickle is reported as corrupt, naming the file
    broken = tmp_path / "broken" / "cifar-100-python"
    broken.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        data = (cifar100_root / "cifar-100-python" / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 3] if name == "train" else data)
    with pytest.raises(ConfigError, match=r"train is corrupt"):
        CIFAR100DataModule(data_dir=str(broken.parent)).setup()


def test_fashion_mnist_reads_idx_files_with_its_own_constants(fashion_root):
    dm = FashionMNISTDataModule(data_dir=str(fashion_root), batch_size=16, val_fraction=0.2)
    assert (dm.num_classes, dm.input_shape) == (10, (1, 28, 28))
    assert (dm.mean, dm.std) == ((0.2860,), (0.3530,))  # Fashion-MNIST's, not MNIST's
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (240, 60, 100)
    assert dm.class_counts("val").tolist() == [6] * 10

    raw = fashion_root / "FashionMNIST" / "raw"
    pixels = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:], dtype=np.uint8)
    assert dm.test_set.labels.tolist() == labels.tolist()
    expected = (torch.from_numpy(pixels.astype(np.float32)).view(-1, 1, 28, 28) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(dm.test_set.normalised(), expected, atol=1e-5, rtol=0)

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 28, 28) and batch["label"].dtype == torch.long


def test_fashion_mnist_does_not_read_mnist_files(mnist_root, fashion_root, tmp_path):
    # MNIST's folder is not Fashion-MNIST's: the error names the folder it looked in
    with pytest.raises(ConfigError) as info:
        FashionMNISTDataModule(data_dir=str(mnist_root)).setup()
    assert info.value.field == "data.data_dir" and "FashionMNIST" in str(info.value)

    # images and labels of different lengths: a truncated download
    bad = write_mnist(tmp_path / "bad", folder="FashionMNIST")
    labels = bad / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    good = (fashion_root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte").read_bytes()
    labels.write_bytes(good[:-5])
    with pytest.raises(ConfigError) as info:
        FashionMNISTDataModule(data_dir=str(bad)).setup()
    assert info.value.field == "data.data_dir" and "truncated" in str(info.value)
