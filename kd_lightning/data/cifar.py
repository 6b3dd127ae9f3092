"""CIFAR-10/100 DataModules over the official "python version" pickle batches.

torchvision downloads and md5-verifies the archive (``download=true``); loading reads the
pickled batches directly so that a truncated or foreign file gets an error that names it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms as T

from kd_lightning.data.base import KDDataModule
from kd_lightning.errors import ConfigError

# The constants of the reference implementations whose tables the repro configs target:
# CIFAR-10: Knowledge-Distillation-Zoo train_kd.py L195-196 (torchdistill's configs give
# the same values to 8 digits). CIFAR-100: RepDistiller dataset/cifar100.py L57 and
# mdistiller mdistiller/dataset/cifar100.py L123 (KD-Zoo's CIFAR-100 values differ by <= 2e-4:
# pass them as data.mean/data.std to match it).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


class CIFAR10DataModule(KDDataModule):
    """CIFAR-10 from ``{data_dir}/cifar-10-batches-py``. Training uses random-crop
    (padding 4) and horizontal flip; val/test are only normalised.

    Args:
        crop_padding_mode: how the random crop pads: ``constant`` (zeros; RepDistiller,
            mdistiller, torchdistill) or ``reflect`` (Knowledge-Distillation-Zoo's
            ``Pad(4, padding_mode='reflect')`` + ``RandomCrop(32)``, train_kd.py L205-206).
        mean, std: normalisation constants (default: the class's reference constants).
        strong_view: also yield a strongly augmented view of every training image (MLKD's:
            crop + flip + RandAugment(2) + Cutout, ``kd_lightning.data.strong_augment``); a
            batch of B images then has 2·B rows, ``batch["strong_view"]`` marking the strong
            ones. Needs the PIL path (no ``augment_on_device``, ``augment_views`` 0).
        **kwargs: see ``KDDataModule``.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"

    def __init__(
        self,
        *args: Any,
        crop_padding_mode: Literal["constant", "reflect"] = "constant",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        strong_view: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if strong_view and (self.augment_on_device or self.augment_views or not self.augment):
            raise ConfigError("data.strong_view", strong_view, "the strong view needs augment: true, "
                              "augment_on_device: false and augment_views: 0")
        self.strong_view = bool(strong_view)
        if crop_padding_mode not in ("constant", "reflect"):
            raise ConfigError("data.crop_padding_mode", crop_padding_mode, "use constant or reflect")
        self.crop_padding_mode = crop_padding_mode
        for field, value in (("mean", mean), ("std", std)):
            if value is not None:
                if len(value) != 3 or (field == "std" and min(value) <= 0):
                    raise ConfigError(f"data.{field}", value, "give 3 per-channel values (std > 0)")
                setattr(self, field, tuple(float(v) for v in value))

    def _torchvision_class(self):
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def download_data(self) -> None:
        from kd_lightning.data.download import fetch_bounded

        cls = self._torchvision_class()
        fix = (f"extract the official python-version archive ({cls.filename}) into "
               f"{self.data_dir} and set data.download: false")
        fetch_bounded(cls.__name__, [cls.url], lambda: cls(self.data_dir, train=True, download=True), fix)

    def augmentations(self) -> list:
        return [T.RandomCrop(32, padding=4, padding_mode=self.crop_padding_mode),
                T.RandomHorizontalFlip()]

    def strong_augmentations(self) -> list | None:
        if not self.strong_view:
            return None
        from kd_lightning.data.strong_augment import StrongAugment

        return [*self.augmentations(), StrongAugment(2)]

    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        root = Path(self.data_dir) / self.folder
        names = self.train_files if train else self.test_files
        missing = [n for n in names if not (root / n).exists()]
        if missing:
            raise ConfigError(
                "data.data_dir",
                self.data_dir,
                f"{type(self).__name__}: {missing} missing from {root}. Set data.download=true "
                "(needs internet) or extract the official python-version archive there.",
            )
        images, labels = [], []
        for name in names:
            data, target = self._read_batch(root / name)
            images.append(data)
            labels.extend(target)
        array = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(labels, dtype=torch.long)

    def _read_batch(self, path: Path) -> tuple[np.ndarray, list[int]]:
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8)
            target = list(entry[self.label_key])
        except Exception as err:  # truncated pickle, wrong file, missing keys
            raise ConfigError(
                "data.data_dir",
                self.data_dir,
                f"{path} is corrupt or not a {type(self).__name__} batch ({err!r}); "
                "delete the folder and re-download with data.download=true",
            ) from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(target):
            raise ConfigError(
                "data.data_dir",
                self.data_dir,
                f"{path} holds data of shape {data.shape} with {len(target)} labels; "
                "expected (N, 3072) and N labels: the file is truncated or foreign",
            )
        return data, target


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from ``{data_dir}/cifar-100-python``."""

    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"

    def _torchvision_class(self):
        from torchvision.datasets import CIFAR100

        return CIFAR100
