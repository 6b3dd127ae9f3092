"""MLKD's strong augmentation (kd_lightning.data.strong_augment) on real PIL images."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from kd_lightning.data.strong_augment import OPS, StrongAugment, cutout, strong_cifar_transform
from kd_lightning.errors import ConfigError


def _image(seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (32, 32, channels), dtype=np.uint8)
    return Image.fromarray(arr if channels == 3 else arr[..., 0], mode)


@pytest.mark.parametrize(("name", "op", "low", "high"), OPS, ids=[o[0] for o in OPS])
def test_every_op_keeps_size_and_mode(name, op, low, high):
    img = _image()
    for v in (low, (low + high) / 2, high):
        out = op(img, v)
        assert out.size == img.size and out.mode == img.mode, (name, v)


def test_strong_augment_is_seeded_and_changes_the_image():
    img = _image(1)
    a = [np.asarray(StrongAugment(seed=3)(img)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])  # same seed, same result
    outs = [np.asarray(StrongAugment(seed=s)(img)) for s in range(8)]
    assert any(not np.array_equal(o, np.asarray(img)) for o in outs)
    assert len({o.tobytes() for o in outs}) > 1  # different seeds, different views


def test_cutout_paints_a_grey_square_inside_the_image():
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    out = np.asarray(cutout(img, 0.25, random.Random(0)))
    painted = (out == np.array([125, 123, 114])).all(axis=2)
    assert 0 < painted.sum() <= 9 * 9  # PIL fills both corner coordinates, as the reference does
    rows, cols = np.nonzero(painted)
    assert rows.max() - rows.min() <= 8 and cols.max() - cols.min() <= 8
    assert np.array_equal(np.asarray(cutout(img, 0.0, random.Random(0))), np.asarray(img))
    grey = np.asarray(cutout(Image.new("L", (32, 32), 0), 0.5, random.Random(1)))
    assert (grey == 120).any()  # single-channel images get the grey level


def test_strong_cifar_transform_gives_a_normalised_tensor():
    random.seed(0)
    torch.manual_seed(0)
    x = strong_cifar_transform()(_image(2))
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() < 0 < x.max()


@pytest.mark.parametrize(("kwargs", "field"), [({"n": -1}, "StrongAugment.n"),
                                               ({"max_cutout": 2.0}, "StrongAugment.max_cutout")])
def test_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        StrongAugment(**kwargs)
