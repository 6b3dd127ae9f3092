"""Tiny ImageFolder trees of real JPEG files (written with PIL), for the ImageNet-path tests.

Each class gets a distinct mean colour plus noise, so a few steps of training can tell the
classes apart, and images have varied sizes so RandomResizedCrop and Resize do real work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg_tree(
    root: Path,
    classes: int = 3,
    per_class: int = 4,
    splits: tuple[str, ...] = ("train", "val"),
    size: tuple[int, int] = (40, 52),
    seed: int = 0,
) -> Path:
    """``root/<split>/class_<c>/img_<i>.JPEG`` for every split; returns ``root``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 31 + 160) % 256])
            for i in range(per_class):
                h, w = size[0] + 4 * (i % 3), size[1] - 4 * (i % 2)
                pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)
    return root
