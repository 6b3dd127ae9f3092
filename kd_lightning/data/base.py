"""The shared DataModule: seeded splits, dict batches and validated loader settings.

A subclass says where its pixels come from (``load_arrays``) and how to augment them;
everything else — splitting, normalisation, loaders, argument checks — lives here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

from kd_lightning.data.datasets import ArrayImageDataset, stratified_split
from kd_lightning.data.resume import ResumableTrainOrder
from kd_lightning.data.tensor_augment import BatchFetch, TensorAugment, collate_batch
from kd_lightning.data.transfer import (
    TransferSource,
    check_label_args,
    labeled_subset,
    resolve_labeled_seed,
    transfer_set,
)
from kd_lightning.errors import ConfigError


class KDDataModule(ResumableTrainOrder, L.LightningDataModule):
    """Base class of every kd-lightning DataModule.

    Args:
        data_dir: where the dataset lives (or is downloaded to).
        download: fetch the dataset with torchvision if it is missing.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        val_fraction: share of the official train split held out for validation, in [0, 1).
            0 = train on the whole train split with no validation loop (the published
            CIFAR protocols: RepDistiller, mdistiller, KD-Zoo and torchdistill train on all
            50,000 images); ``val_dataloader`` then returns no loader, so Lightning skips
            validation and checkpoints keep the last epoch.
        seed: seed of the train/val split (independent of the training seed).
        augment: apply the dataset's standard training augmentation.
        pin_memory: pin host memory (useful on GPU).
        labeled_fraction: keep labels for only this stratified, seeded share of the train
            split, in (0, 1]; the rest stays in the transfer set with label -1.
        num_labeled: the same as an absolute count (per-class counts are rounded).
        labeled_seed: seed of the labelled subset (default: ``seed``); ``run`` = the run's
            ``seed_everything``, so seeded repeats also redraw the subset. Vary this, not
            ``seed``, across runs: ``seed`` also fixes val/test, which a teacher must share.
        train_on: what the train loader yields: ``all`` = the transfer set (every train
            image, unlabelled ones with label -1, plus ``extra_transfer``; for KD) or
            ``labeled`` = the labelled subset only (for a from-scratch baseline).
        extra_transfer: optional source of extra unlabelled images for the transfer set
            (``kd_lightning.data.transfer``); needs ``train_on: all``.
        augment_on_device: the fast data path: training batches leave the loader as uint8
            and are cropped, flipped and normalised as whole batches on the training device
            (``kd_lightning.data.tensor_augment``), instead of image by image with PIL in
            DataLoader workers. Same augmentation distribution, same normalisation.
        augment_views: 0 = fresh random augmentation every epoch; K > 0 = K fixed,
            deterministic augmented views per image, view ``epoch % K`` in each epoch
            (what ``model.teacher_cache`` needs to reuse teacher outputs).
    """

    #: set by each subclass; linked into the model's ``num_classes``/``input_shape``
    num_classes: int = 10
    input_shape: tuple[int, ...] = (1, 28, 28)
    #: token-id batch key → vocabulary size, for text data (None for images)
    vocab_sizes: dict[str, int] | None = None
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
        labeled_fraction: float | None = None,
        num_labeled: int | None = None,
        labeled_seed: int | Literal["run"] | None = None,
        train_on: Literal["all", "labeled"] = "all",
        extra_transfer: TransferSource | None = None,
        augment_on_device: bool = False,
        augment_views: int = 0,
    ) -> None:
        super().__init__()
        if augment_views < 0:
            raise ConfigError(
                "data.augment_views", augment_views, "use 0 (random augmentation) or K >= 1 views"
            )
        self.augment_on_device, self.augment_views = augment_on_device, augment_views
        #: the on-device augmenter of training batches (set by ``setup`` if augment_on_device)
        self.device_augment: TensorAugment | None = None
        check_label_args(labeled_fraction, num_labeled, train_on, extra_transfer)
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value <= 0:
                raise ConfigError(f"data.{field}", value, "use a batch size of at least 1")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(
                "data.val_fraction", val_fraction, "use a fraction in [0, 1), e.g. 0.1 (0 = no val)"
            )
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
        self.labeled_fraction, self.num_labeled = labeled_fraction, num_labeled
        self.labeled_seed = resolve_labeled_seed(labeled_seed, seed)
        self.train_on, self.extra_transfer = train_on, extra_transfer
        #: rows of the train source array with visible labels (set by ``setup``)
        self.labeled_indices: Tensor | None = None
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

    def strong_augmentations(self) -> list[Callable] | None:
        """PIL-level augmentations of a second, strong view of every training image (MLKD's;
        ``kd_lightning.data.strong_augment``), or None for a single view."""
        return None

    # -- Lightning hooks ---------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            self.download_data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays(train=True)
        if self.val_fraction == 0:  # the published protocol: every train image, no val split
            train_idx = torch.arange(len(labels))
        else:
            train_idx, val_idx = stratified_split(labels, [self.val_fraction], self.seed)
            self.val_set = self._dataset(images, labels, val_idx, train=False)
        self.train_set = self._train_dataset(images, labels, train_idx)
        test_images, test_labels = self.load_arrays(train=False)
        self.test_set = self._dataset(test_images, test_labels, None, train=False)

    def _train_dataset(self, images: Tensor, labels: Tensor, train_idx: Tensor) -> ArrayImageDataset:
        """The train loader's dataset: the labelled subset or the transfer set (``train_on``).

        Hidden labels live in a per-dataset copy of ``labels`` (val/test share the source
        array and keep theirs), so the dataset itself yields -1 for unlabelled samples.
        """
        self.labeled_indices = labeled_subset(
            labels, train_idx, self.labeled_fraction, self.num_labeled, self.labeled_seed
        )
        if self.train_on == "labeled":
            return self._dataset(images, labels, self.labeled_indices, train=True)
        arrays = transfer_set(
            images, labels, train_idx, self.labeled_indices, self.extra_transfer, self.labeled_seed
        )
        return self._dataset(*arrays, train=True)

    @property
    def num_unlabelled(self) -> int:
        """Training samples whose label is hidden (-1); 0 before ``setup``."""
        ds = self.train_set
        return 0 if ds is None else int((ds.labels[ds.indices] < 0).sum())

    def _dataset(
        self, images: Tensor, labels: Tensor, indices: Tensor | None, train: bool
    ) -> ArrayImageDataset:
        transform = None
        augmentations = self.augmentations() if train and self.augment else []
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))  # follows seed_everything
        if train and self.augment_on_device:
            self.device_augment = TensorAugment.from_transforms(
                augmentations, self.mean, self.std, tuple(images.shape[1:3]), seed
            )
            return ArrayImageDataset(
                images, labels, indices, None, self.mean, self.std, self.augment_views, seed,
                raw=True, augmented=self.device_augment.augments,
            )
        if augmentations:
            transform = T.Compose([*augmentations, T.ToTensor(), T.Normalize(self.mean, self.std)])
        views = self.augment_views if train else 0
        strong = self.strong_augmentations() if train and self.augment else None
        if strong:  # two views per image: the batch holds both (strong_augment.collate_strong_views)
            from kd_lightning.data.strong_augment import StrongViewDataset

            pipeline = T.Compose([*strong, T.ToTensor(), T.Normalize(self.mean, self.std)])
            return StrongViewDataset(images, labels, indices, transform, self.mean, self.std, views,
                                     seed, strong_transform=pipeline)
        return ArrayImageDataset(images, labels, indices, transform, self.mean, self.std, views, seed)

    def _loader(
        self, dataset, shuffle: bool, batch_size: int, sampler: Sampler | None = None
    ) -> DataLoader:
        raw = getattr(dataset, "raw", False)  # on-device path: fetch whole batches at once
        return DataLoader(
            BatchFetch(dataset) if raw else dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            collate_fn=collate_batch if raw else getattr(dataset, "collate", None),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        # shuffled by (seed_everything's seed, epoch), resumable mid-epoch, and with
        # augment_views = K pairing each index with this epoch's view (epoch % K)
        sampler = self.train_sampler(self.train_set, self.augment_views, self.seed)
        return self._loader(self.train_set, True, self.batch_size, sampler)

    @property
    def augments_randomly(self) -> bool:
        """Whether a training image can look different every time it is drawn (so no
        per-sample teacher output can be cached)."""
        return self.augment and bool(self.augmentations()) and not self.augment_views

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.seed_step_rng()  # training randomness = f(seed, batch number): exact resume
        # The fast data path: only training batches arrive as uint8 (val/test are normalised
        # once on the host), so this runs exactly where the PIL pipeline would have.
        if (
            self.device_augment is not None and isinstance(batch, dict)
            and batch["image"].dtype == torch.uint8
        ):
            batch["image"] = self.device_augment(batch["image"], batch.get("index"), batch.get("view"))
        return batch

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.val_set is None:  # val_fraction 0: no loader, so Lightning skips validation
            return []
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def class_counts(self, split: str = "train") -> torch.Tensor:
        ds = getattr(self, f"{split}_set")
        labels = ds.labels[ds.indices]
        return torch.bincount(labels[labels >= 0], minlength=self.num_classes)
