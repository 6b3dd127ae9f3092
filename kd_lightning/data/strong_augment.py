"""The strong augmentation of MLKD (Jin et al. 2023, CVPR): FixMatch-style RandAugment.

MLKD trains every batch on two views of each image: the ordinary (weak) CIFAR view and a
strongly augmented one. The reference (sunshangquan/logit-standardization-KD,
``mdistiller/dataset/cifar100.py``, ``get_cifar100_train_transform_strong``) builds the
strong view as

    RandomCrop(32, padding=4) → RandomHorizontalFlip → RandAugment(n=2) → ToTensor → Normalize

where this RandAugment (FixMatch's variant) applies ``n`` ops drawn with replacement from
``OPS``, each at a magnitude drawn uniformly from its range, then a Cutout of a random side
up to half the image, filled with grey (125, 123, 114). ``StrongAugment`` is that
transform on PIL images (a torchvision-style callable); ``strong_cifar_transform`` is the whole
pipeline. It is a separate, named data option: an MLKD comparison can leave it out (the
``MLKD`` head then works on the single ordinary view).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch import Tensor
from torch.utils.data import default_collate

from kd_lightning.data.datasets import ArrayImageDataset
from kd_lightning.errors import ConfigError

Op = Callable[[Image.Image, float], Image.Image]

#: Cutout's fill colour (the CIFAR mean, in 0-255), as in the reference
CUTOUT_FILL = (125, 123, 114)


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs)


#: (name, op, lowest magnitude, highest magnitude), as in FixMatch's RandAugment
OPS: list[tuple[str, Op, float, float]] = [
    ("auto_contrast", lambda img, _: ImageOps.autocontrast(img), 0, 1),
    ("brightness", lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    ("color", lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    ("contrast", lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    ("equalize", lambda img, _: ImageOps.equalize(img), 0, 1),
    ("identity", lambda img, _: img, 0, 1),
    ("posterize", lambda img, v: ImageOps.posterize(img, max(1, int(v))), 4, 8),
    ("rotate", lambda img, v: img.rotate(v), -30, 30),
    ("sharpness", lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    ("shear_x", lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ("shear_y", lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ("solarize", lambda img, v: ImageOps.solarize(img, int(v)), 0, 256),
    ("translate_x", lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),
    ("translate_y", lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),
]


def cutout(
    img: Image.Image, fraction: float, rng: random.Random, fill: Sequence[int] = CUTOUT_FILL
) -> Image.Image:
    """Paint a square of side ``fraction × width`` at a random centre (clipped at the
    border) with ``fill``; ``fraction <= 0`` returns the image unchanged."""
    if fraction <= 0:
        return img
    side = fraction * img.size[0]
    w, h = img.size
    x0 = int(max(0, rng.uniform(0, w) - side / 2))
    y0 = int(max(0, rng.uniform(0, h) - side / 2))
    box = (x0, y0, min(w, x0 + side), min(h, y0 + side))
    out = img.copy()
    colour = tuple(fill) if out.mode == "RGB" else int(sum(fill) / len(fill))
    ImageDraw.Draw(out).rectangle(box, fill=colour)
    return out


class StrongAugment:
    """FixMatch-style RandAugment on a PIL image: ``n`` random ops at random magnitudes,
    then Cutout of up to ``max_cutout`` of the width.

    Args:
        n: ops per image (reference: 2).
        max_cutout: the largest Cutout side as a fraction of the width (reference: 0.5).
        seed: seeds this transform's own generator (``None``: from the global ``random``
            state, as in a DataLoader worker, whose ``random`` is seeded per worker).
    """

    def __init__(self, n: int = 2, max_cutout: float = 0.5, seed: int | None = None) -> None:
        if n < 0:
            raise ConfigError("StrongAugment.n", n, "use a number of ops >= 0 (reference: 2)")
        if not 0 <= max_cutout <= 1:
            raise ConfigError(
                "StrongAugment.max_cutout", max_cutout, "use a fraction in [0, 1] (0.5)"
            )
        self.n, self.max_cutout = n, max_cutout
        self.rng = random.Random(seed) if seed is not None else random

    def __call__(self, img: Image.Image) -> Image.Image:
        for _, op, low, high in self.rng.choices(OPS, k=self.n):
            img = op(img, low + (high - low) * self.rng.random())
        return cutout(img, self.rng.random() * self.max_cutout, self.rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, max_cutout={self.max_cutout})"


def strong_cifar_transform(
    mean: Sequence[float] = (0.5071, 0.4867, 0.4408),
    std: Sequence[float] = (0.2675, 0.2565, 0.2761),
    n: int = 2,
) -> Callable[[Image.Image], object]:
    """The reference's whole strong-view pipeline for 32×32 images (CIFAR-100 statistics by
    default): crop with 4-pixel padding, flip, ``StrongAugment``, to a normalised tensor."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            StrongAugment(n),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class StrongViewDataset(ArrayImageDataset):
    """An ``ArrayImageDataset`` whose samples also carry ``strong_image``: the same image
    through ``strong_transform`` (the DataModules' ``strong_view`` option). ``collate``
    (``collate_strong_views``) turns a list of such samples into one batch of 2·B rows."""

    def __init__(self, *args: Any, strong_transform: Callable, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strong_transform = strong_transform
        self.collate = collate_strong_views

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        sample = super().__getitem__(key)
        i = key[0] if isinstance(key, tuple) else key
        array = self.images[int(self.indices[i])].numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        sample["strong_image"] = self.strong_transform(pil)
        return sample

    def get_batch(self, keys):  # per image anyway (PIL pipelines)
        return collate_strong_views([self[k] for k in keys])


def collate_strong_views(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """B samples → one batch of 2·B rows: the B ordinary views, then the B strong views of
    the same images (labels and indices repeated; ``view`` -1 on the strong rows, fresh
    random), flagged by ``batch["strong_view"]`` (what the ``MLKD`` head reads). The
    reference sums the CE of both views: a CrossEntropy head, which averages over the 2·B
    rows, needs twice the reference's CE weight to equal it."""
    batch = default_collate(samples)
    strong = batch.pop("strong_image")
    n = len(strong)
    out = {k: torch.cat([v, v]) for k, v in batch.items() if k not in ("image", "view")}
    out["image"] = torch.cat([batch["image"], strong])
    out["view"] = torch.cat([batch["view"], torch.full_like(batch["view"], -1)])
    out["strong_view"] = torch.cat(
        [torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]
    )
    return out
