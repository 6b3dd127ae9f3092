"""In-memory image datasets that yield dict batches ``{"image", "label", "index", "view"}``.

Images are held as one uint8 tensor (N, H, W, C). ``index`` is the sample's position in
its source split: stable across runs, so CRD memory banks and teacher caches can key on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from kd_lightning.data.tensor_augment import view_seed


class ArrayImageDataset(Dataset):
    """A view (``indices``) of a uint8 image array, with either a PIL transform pipeline
    (augmentation) or a one-off vectorised normalisation (evaluation)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Sequence[int] | Tensor | None = None,
        transform: Callable | None = None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        views: int = 0,
        view_seed: int = 0,
        raw: bool = False,
        augmented: bool | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.indices = torch.arange(len(images)) if indices is None else torch.as_tensor(indices)
        self.transform = transform
        self.mean, self.std = tuple(mean), tuple(std)
        self._normalised: Tensor | None = None
        # Augmentation views (see kd_lightning.data.tensor_augment): with views = K > 0 the
        # augmentation of (sample, view) is seeded by (view_seed, index, view), so it is the
        # same image every time. raw: yield uint8 (C, H, W) and let TensorAugment augment and
        # normalise whole batches on the training device; ``augmented`` says whether it will.
        self.views, self.view_seed, self.raw = int(views), int(view_seed), raw
        self.augmented = transform is not None if augmented is None else augmented

    def __len__(self) -> int:
        return len(self.indices)

    def normalised(self) -> Tensor:
        """All selected images as a normalised float tensor (N, C, H, W), computed once."""
        if self._normalised is None:
            x = self.images[self.indices].permute(0, 3, 1, 2).float().div_(255)
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            self._normalised = (x - mean) / std
        return self._normalised

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        """``dataset[i]``, or ``dataset[i, view]`` (what the train sampler asks for when
        ``augment_views`` > 0).

        ``batch["view"]`` is the view of a deterministic augmentation, 0 when the image is
        not augmented and -1 when its augmentation is fresh random (not reproducible).
        """
        i, view = key if isinstance(key, tuple) else (key, 0)
        src = int(self.indices[i])
        if not self.augmented:
            view = 0
        elif not self.views:
            view = -1
        if self.raw:
            image = self.images[src].permute(2, 0, 1)
        elif self.transform is None:
            image = self.normalised()[i]
        else:
            array = self.images[src].numpy()
            pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
            if view >= 0:  # torchvision draws from torch's global RNG: seed it per (index, view)
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only (torchvision's transforms draw from it):
                    # torch.manual_seed would also seed, per image, every GPU backend
                    torch.default_generator.manual_seed(view_seed(self.view_seed, src, view))
                    image = self.transform(pil)
            else:
                image = self.transform(pil)
        return {
            "image": image, "label": self.labels[src], "index": torch.tensor(src),
            "view": torch.tensor(view),
        }

    def get_batch(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, Tensor]:
        """The collated batch of ``[self[k] for k in keys]``, with one gather per field
        when possible: with ``raw`` (on-device augmentation) the loader's cost per image
        becomes negligible (see ``tensor_augment.BatchFetch``)."""
        if self.transform is not None:  # PIL pipelines are per image anyway
            return default_collate([self[k] for k in keys])
        pairs = torch.tensor([k if isinstance(k, tuple) else (k, 0) for k in keys]).view(-1, 2)
        pos, view = pairs[:, 0], pairs[:, 1]
        if not self.augmented:
            view = torch.zeros_like(view)
        elif not self.views:
            view = torch.full_like(view, -1)
        src = self.indices[pos]
        image = self.images[src].permute(0, 3, 1, 2) if self.raw else self.normalised()[pos]
        return {"image": image, "label": self.labels[src], "index": src, "view": view}


def stratified_split(
    labels: Tensor, fractions: Sequence[float], seed: int
) -> list[Tensor]:
    """Split indices into len(fractions)+1 parts, class by class, reproducibly.

    ``fractions`` are the sizes of all parts but the first (which gets the rest).
    Per-class counts are rounded, so every part holds every class in proportion.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        sizes = [int(round(f * len(idx))) for f in fractions]
        first = len(idx) - sum(sizes)
        for part, size in zip(parts, [first, *sizes]):
            part.append(idx[start : start + size])
            start += size
    return [torch.sort(torch.cat(p)).values for p in parts]


def to_uint8_nhwc(array: np.ndarray) -> Tensor:
    """Accept (N, H, W) or (N, H, W, C) pixel arrays; return uint8 NHWC."""
    t = torch.as_tensor(np.ascontiguousarray(array))
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    return t.to(torch.uint8).contiguous()
