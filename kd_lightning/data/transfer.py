"""Transfer sets: the labelled subset of a train split, and extra unlabelled images.

Hinton et al. (2015) call the data a student is distilled on the *transfer set*. It need not
be labelled (the teacher supplies the targets), so it can be larger than the labelled set:
the rest of the train split with labels hidden (``labeled_fraction``), plus any extra source
plugged in as ``data.extra_transfer``. A source is one small class::

    class MySource(TransferSource):
        def images(self, context: TransferContext) -> Tensor:
            return my_uint8_images  # (M, H, W, C), same H, W, C as the dataset

and in YAML::

    data:
      init_args:
        extra_transfer:
          class_path: my_package.MySource
          init_args: {...}

Its images join the training set with label -1 (so label-using heads skip them) and with
``index`` values past the end of the train split's source array, so they never collide
with train/val indices (which key CRD memory banks and teacher caches).

Text DataModules (``kd_lightning.data.text``) take a ``TextTransferSource`` instead: its
``texts(context)`` returns strings, which the DataModule tokenizes like its own texts and
appends the same way (label -1, fresh indices). ``TextAugmentTransfer`` (Tang et al. 2019's
augmentation, ``kd_lightning.data.text_augment``) and ``TextFileSource`` are the built-ins.
"""

from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.data.datasets import stratified_split
from kd_lightning.errors import ConfigError


@dataclass(frozen=True)
class TransferContext:
    """What a source may look at to produce its images.

    Attributes:
        images: the uint8 (N, H, W, C) source array of the train split (val rows included:
            only index it with ``train_indices``/``labeled_indices``).
        train_indices: rows of ``images`` in the train split.
        labeled_indices: rows of ``images`` whose labels are visible (a subset of the above).
        seed: a seed for any randomness, so the extra data is reproducible.
    """

    images: Tensor
    train_indices: Tensor
    labeled_indices: Tensor
    seed: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) that every extra image must have."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


class TransferSource(ABC):
    """A plug-in source of unlabelled images for the transfer set (``data.extra_transfer``)."""

    @abstractmethod
    def images(self, context: TransferContext) -> Tensor:
        """Return uint8 images (M, H, W, C) with ``context.image_shape``; labels are not used."""


class ArrayFileSource(TransferSource):
    """Images from a ``.npz``, ``.npy`` or ``.pt`` file of uint8 pixels.

    Accepted layouts: (M, H, W), (M, H, W, C) or (M, C, H, W), matched against the dataset's
    image shape. A ``.npz``/``.pt`` dict needs ``key`` unless it holds a single array.

    Args:
        path: the file.
        key: array name inside a ``.npz`` or a dict saved with ``torch.save``.
        max_samples: keep a seeded random subset of at most this many images.
    """

    def __init__(self, path: str, key: str | None = None, max_samples: int | None = None) -> None:
        if max_samples is not None and max_samples < 1:
            raise ConfigError("data.extra_transfer.max_samples", max_samples, "use at least 1, or null for all")
        self.path = path
        self.key = key
        self.max_samples = max_samples

    def _load(self) -> Tensor:
        path, field = Path(self.path), "data.extra_transfer.path"
        if not path.is_file():
            raise ConfigError(field, self.path, "no such file; give a .npz, .npy or .pt of uint8 images")
        try:
            if path.suffix == ".pt":
                data = torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix in (".npz", ".npy"):
                loaded = np.load(path, allow_pickle=False)
                data = dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
            else:
                raise ConfigError(field, self.path, "use a .npz, .npy or .pt file")
        except ConfigError:
            raise
        except Exception as err:  # corrupt archive, pickled objects, …
            raise ConfigError(field, self.path, f"cannot read it ({err!r})") from None
        if isinstance(data, dict):
            if self.key is None and len(data) != 1:
                raise ConfigError(
                    "data.extra_transfer.key", None, f"the file holds {sorted(data)}: name the image array"
                )
            key = self.key if self.key is not None else next(iter(data))
            if key not in data:
                raise ConfigError("data.extra_transfer.key", key, f"the file holds {sorted(data)}")
            data = data[key]
        return torch.as_tensor(np.asarray(data))

    def images(self, context: TransferContext) -> Tensor:
        array = self._load()
        if array.dtype != torch.uint8:
            raise ConfigError(
                "data.extra_transfer.path", self.path,
                f"images must be uint8 pixels, got {array.dtype}; convert with "
                "`(x * 255).round().astype(np.uint8)` if they are floats in [0, 1]",
            )
        h, w, c = context.image_shape
        if array.ndim == 3 and c == 1:
            array = array.unsqueeze(-1)
        elif array.ndim == 4 and tuple(array.shape[1:]) == (c, h, w) and (h, w, c) != (c, h, w):
            array = array.permute(0, 2, 3, 1)
        if array.ndim != 4 or tuple(array.shape[1:]) != (h, w, c):
            raise ConfigError(
                "data.extra_transfer.path", self.path,
                f"images of shape {tuple(array.shape)} do not match the dataset's (N, {h}, {w}, {c})",
            )
        if self.max_samples is not None and len(array) > self.max_samples:
            gen = torch.Generator().manual_seed(context.seed)
            keep = torch.randperm(len(array), generator=gen)[: self.max_samples]
            array = array[torch.sort(keep).values]
        return array.contiguous()


class AugmentedCopies(TransferSource):
    """``copies`` randomly augmented copies of the labelled (or all train) images.

    A seeded, vectorised random affine warp (rotation, scale, translation, optional
    horizontal flip) is applied once, so the copies are fixed extra samples. Useful when
    the labelled set is tiny and no other images exist: the teacher labels the warps.

    Args:
        copies: augmented copies per image.
        of: which images to copy: the ``labeled`` subset or the whole ``train`` split.
        degrees: maximum rotation in degrees (uniform in ±degrees).
        translate: maximum shift as a fraction of the image size.
        scale: (min, max) zoom factor.
        hflip: also flip horizontally with probability 0.5 (not for digits).
    """

    def __init__(
        self,
        copies: int = 1,
        of: Literal["labeled", "train"] = "labeled",
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        hflip: bool = False,
    ) -> None:
        if copies < 1:
            raise ConfigError("data.extra_transfer.copies", copies, "use at least 1 copy")
        if of not in ("labeled", "train"):
            raise ConfigError("data.extra_transfer.of", of, "use 'labeled' or 'train'")
        if degrees < 0 or not 0 <= translate < 1:
            raise ConfigError(
                "data.extra_transfer", {"degrees": degrees, "translate": translate},
                "use degrees >= 0 and translate in [0, 1)",
            )
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ConfigError("data.extra_transfer.scale", scale, "use (min, max) with 0 < min <= max")
        self.copies = copies
        self.of = of
        self.degrees = float(degrees)
        self.translate = float(translate)
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = hflip

    def images(self, context: TransferContext) -> Tensor:
        rows = context.labeled_indices if self.of == "labeled" else context.train_indices
        src = context.images[rows].repeat(self.copies, 1, 1, 1)  # (M, H, W, C) uint8
        gen = torch.Generator().manual_seed(context.seed)
        return warp(src, self._thetas(len(src), gen), batch=4096)

    def _thetas(self, n: int, gen: torch.Generator) -> Tensor:
        """Per-image 2×3 affine matrices in affine_grid's normalised [-1, 1] coordinates."""

        def uniform(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        angle = uniform(-self.degrees, self.degrees) * math.pi / 180
        zoom = uniform(*self.scale)
        # a shift of t·size pixels is 2t in normalised coordinates
        shift = torch.stack([uniform(-self.translate, self.translate) for _ in range(2)], 1) * 2
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(n)
        # affine_grid maps output → input coordinates, so invert the zoom there
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ], 1)
        return theta


def warp(images: Tensor, theta: Tensor, batch: int = 4096) -> Tensor:
    """Apply per-image affine ``theta`` (M, 2, 3) to uint8 NHWC images, zero-padding outside."""
    out = torch.empty_like(images)
    for start in range(0, len(images), batch):
        x = images[start : start + batch].permute(0, 3, 1, 2).float()
        grid = F.affine_grid(theta[start : start + batch], list(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start : start + batch] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


# -- how KDDataModule builds its train set (kept here so data/base.py stays small) ---------
def check_label_args(
    labeled_fraction: float | None,
    num_labeled: int | None,
    train_on: str,
    extra_transfer: TransferSource | TextTransferSource | None,
    source_type: type = TransferSource,
) -> None:
    """Validate the DataModule's label-scarcity arguments before anything is loaded
    (``source_type``: the transfer-source class the DataModule accepts)."""
    if labeled_fraction is not None and num_labeled is not None:
        raise ConfigError(
            "data.num_labeled", num_labeled, "set either data.labeled_fraction or data.num_labeled, not both"
        )
    if labeled_fraction is not None and not 0.0 < labeled_fraction <= 1.0:
        raise ConfigError("data.labeled_fraction", labeled_fraction, "use a fraction in (0, 1], e.g. 0.1")
    if num_labeled is not None and num_labeled < 1:
        raise ConfigError("data.num_labeled", num_labeled, "use at least 1 labelled sample")
    if train_on not in ("all", "labeled"):
        raise ConfigError("data.train_on", train_on, "use 'all' (the transfer set, for KD) or 'labeled'")
    if extra_transfer is not None and not isinstance(extra_transfer, source_type):
        examples = (
            "TextAugmentTransfer or TextFileSource" if source_type is TextTransferSource
            else "ArrayFileSource or AugmentedCopies"
        )
        raise ConfigError(
            "data.extra_transfer", type(extra_transfer).__name__,
            f"give a kd_lightning.data.transfer.{source_type.__name__}, e.g. {examples}",
        )
    if extra_transfer is not None and train_on == "labeled":
        raise ConfigError(
            "data.train_on", train_on,
            "extra_transfer images are unlabelled, so they need data.train_on=all (the KD transfer set)",
        )


def resolve_labeled_seed(labeled_seed: int | str | None, seed: int) -> int:
    """``None`` → the split ``seed``; ``"run"`` → the run's ``seed_everything`` (which
    LightningCLI applies before building the DataModule); an int → itself."""
    if labeled_seed is None:
        return int(seed)
    if labeled_seed == "run":
        run_seed = os.environ.get("PL_GLOBAL_SEED")
        if run_seed is None:
            raise ConfigError(
                "data.labeled_seed", labeled_seed,
                "no run seed is set: set seed_everything (or call lightning.seed_everything) first, "
                "or give an int",
            )
        return int(run_seed)
    if isinstance(labeled_seed, bool) or not isinstance(labeled_seed, int):
        raise ConfigError("data.labeled_seed", labeled_seed, "use an int, 'run' or null")
    return labeled_seed


def labeled_subset(
    labels: Tensor,
    train_idx: Tensor,
    labeled_fraction: float | None,
    num_labeled: int | None,
    seed: int,
) -> Tensor:
    """Rows of ``train_idx`` that keep their labels: stratified (per-class counts rounded)
    and seeded; all of them when neither a fraction nor a count is given."""
    if labeled_fraction is None and num_labeled is None:
        return train_idx
    if num_labeled is not None and num_labeled > len(train_idx):
        raise ConfigError("data.num_labeled", num_labeled, f"the train split has only {len(train_idx)} samples")
    fraction = labeled_fraction if labeled_fraction is not None else num_labeled / len(train_idx)
    if fraction >= 1.0:
        return train_idx
    _, picked = stratified_split(labels[train_idx], [fraction], seed)
    subset = train_idx[picked]
    missing = sorted(set(labels[train_idx].tolist()) - set(labels[subset].tolist()))
    if missing:
        warnings.warn(
            f"the labelled subset ({len(subset)} samples) has no sample of classes {missing}; "
            "raise data.labeled_fraction / data.num_labeled",
            stacklevel=3,
        )
    return subset


def transfer_set(
    images: Tensor,
    labels: Tensor,
    train_idx: Tensor,
    labeled_idx: Tensor,
    extra: TransferSource | None,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(images, labels, indices) of the KD transfer set: every train row, labels outside
    ``labeled_idx`` hidden as -1, then the ``extra`` source's images (label -1).

    Labels are hidden in a copy, never in ``labels`` itself: the val split indexes the same
    source array and must keep its labels.
    """
    if extra is None and len(labeled_idx) == len(train_idx):
        return images, labels, train_idx
    visible = torch.full_like(labels, -1)
    visible[labeled_idx] = labels[labeled_idx]
    if extra is None:
        return images, visible, train_idx
    more = extra.images(TransferContext(images, train_idx, labeled_idx, seed))
    if not isinstance(more, Tensor) or more.dtype != torch.uint8 or more.shape[1:] != images.shape[1:]:
        got = f"{more.dtype} {tuple(more.shape)}" if isinstance(more, Tensor) else type(more).__name__
        raise ConfigError(
            "data.extra_transfer", type(extra).__name__,
            f"it returned {got}; return uint8 images (M, {', '.join(map(str, images.shape[1:]))})",
        )
    # extra rows go after the whole source array, so their `index` collides with no train/val row
    indices = torch.cat([train_idx, torch.arange(len(images), len(images) + len(more))])
    return torch.cat([images, more]), torch.cat([visible, visible.new_full((len(more),), -1)]), indices


# -- text ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextTransferContext:
    """What a text source may look at to produce its texts.

    Attributes:
        texts: every text of the DataModule's corpus (val/test rows included: only index it
            with ``train_indices``/``labeled_indices``).
        train_indices: rows of ``texts`` in the train split.
        labeled_indices: rows of ``texts`` whose labels are visible (a subset of the above).
        seed: a seed for any randomness, so the extra texts are reproducible.
        mask_token: the tokenizer's mask token (``[MASK]`` for the offline WordPiece), or
            None when it has none.
    """

    texts: Sequence[str]
    train_indices: Tensor
    labeled_indices: Tensor
    seed: int
    mask_token: str | None = None


class TextTransferSource(ABC):
    """A plug-in source of unlabelled texts for a text DataModule's transfer set."""

    @abstractmethod
    def texts(self, context: TextTransferContext) -> list[str]:
        """Return extra texts; the DataModule tokenizes them and gives them label -1."""


class TextFileSource(TextTransferSource):
    """Unlabelled texts from a UTF-8 file, one text per line (blank lines skipped).

    Args:
        path: the file.
        max_samples: keep a seeded random subset of at most this many lines.
    """

    def __init__(self, path: str, max_samples: int | None = None) -> None:
        if max_samples is not None and max_samples < 1:
            raise ConfigError("data.extra_transfer.max_samples", max_samples, "use at least 1, or null for all")
        self.path = path
        self.max_samples = max_samples

    def texts(self, context: TextTransferContext) -> list[str]:
        path = Path(self.path)
        if not path.is_file():
            raise ConfigError("data.extra_transfer.path", self.path, "no such file; give a text file, one text per line")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as err:
            raise ConfigError("data.extra_transfer.path", self.path, f"not UTF-8 text ({err.reason})") from None
        lines = [line for line in lines if line]
        if self.max_samples is not None and len(lines) > self.max_samples:
            gen = torch.Generator().manual_seed(context.seed)
            keep = torch.sort(torch.randperm(len(lines), generator=gen)[: self.max_samples]).values
            lines = [lines[i] for i in keep.tolist()]
        return lines


def text_transfer_set(
    texts: Sequence[str],
    labels: Tensor,
    train_idx: Tensor,
    labeled_idx: Tensor,
    extra: TextTransferSource | None,
    seed: int,
    mask_token: str | None,
) -> tuple[list[str], Tensor, Tensor]:
    """(extra texts, labels, indices) of a text KD transfer set, the counterpart of
    ``transfer_set``: ``labels`` covers the corpus plus the extra texts, with every label
    outside ``labeled_idx`` hidden as -1 (in a copy: val/test keep theirs), and ``indices``
    are the train rows followed by the extra texts' rows, numbered past the corpus."""
    visible = torch.full_like(labels, -1)
    visible[labeled_idx] = labels[labeled_idx]
    if extra is None:
        return [], visible, train_idx
    more = extra.texts(TextTransferContext(texts, train_idx, labeled_idx, seed, mask_token))
    if not isinstance(more, list) or not all(isinstance(t, str) for t in more):
        raise ConfigError(
            "data.extra_transfer", type(extra).__name__, f"it returned {type(more).__name__}; return a list of str"
        )
    indices = torch.cat([train_idx, torch.arange(len(texts), len(texts) + len(more))])
    return more, torch.cat([visible, visible.new_full((len(more),), -1)]), indices
