"""The shared DataModule: seeded splits, dict batches and validated loader settings.

A subclass says where its pixels come from (``load_arrays``) and how to augment them;
everything else — splitting, normalisation, loaders, argument checks — lives here.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms as T

from kd_lightning.data.datasets import ArrayImageDataset, stratified_split
from kd_lightning.errors import ConfigError


class KDDataModule(L.LightningDataModule):
    """Base class of every kd-lightning DataModule.

    Args:
        data_dir: where the dataset lives (or is downloaded to).
        download: fetch the dataset with torchvision if it is missing.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        val_fraction: share of the official train split held out for validation, in (0, 1).
        seed: seed of the train/val split (independent of the training seed).
        augment: apply the dataset's standard training augmentation.
        pin_memory: pin host memory (useful on GPU).
    """

    #: set by each subclass; linked into the model's ``num_classes``/``input_shape``
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 28, 28)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value <= 0:
                raise ConfigError(f"data.{field}", value, "use a batch size of at least 1")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "use a fraction in (0, 1), e.g. 0.1")
        if num_workers < 0:
            raise ConfigError("data.num_workers", num_workers, "use 0 or more workers")
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.train_set: ArrayImageDataset | None = None
        self.val_set: ArrayImageDataset | None = None
        self.test_set: ArrayImageDataset | None = None

    # -- subclass API ------------------------------------------------------------------
    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return (uint8 images N×H×W×C, int64 labels) of the official train or test split."""
        raise NotImplementedError

    def download_data(self) -> None:
        """Fetch the files into ``data_dir`` (called from ``prepare_data`` if ``download``)."""

    def augmentations(self) -> list[Callable]:
        """PIL-level training augmentations (before ToTensor/Normalize)."""
        return []

    # -- Lightning hooks ---------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            self.download_data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays(train=True)
        train_idx, val_idx = stratified_split(labels, [self.val_fraction], self.seed)
        self.train_set = self._dataset(images, labels, train_idx, train=True)
        self.val_set = self._dataset(images, labels, val_idx, train=False)
        test_images, test_labels = self.load_arrays(train=False)
        self.test_set = self._dataset(test_images, test_labels, None, train=False)

    def _dataset(
        self, images: Tensor, labels: Tensor, indices: Tensor | None, train: bool
    ) -> ArrayImageDataset:
        transform = None
        if train and self.augment and self.augmentations():
            transform = T.Compose(
                [*self.augmentations(), T.ToTensor(), T.Normalize(self.mean, self.std)]
            )
        return ArrayImageDataset(images, labels, indices, transform, self.mean, self.std)

    def _loader(self, dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def class_counts(self, split: str = "train") -> torch.Tensor:
        ds = getattr(self, f"{split}_set")
        return torch.bincount(ds.labels[ds.indices].clamp_min(0), minlength=self.num_classes)
