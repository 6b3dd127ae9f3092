"""The on-device data path: same normalisation and augmentation statistics as the PIL path,
deterministic augmentation views, and the DataModule wiring."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms as T

from kd_lightning.data import CIFAR10DataModule
from kd_lightning.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from kd_lightning.data.datasets import ArrayImageDataset
from kd_lightning.data.tensor_augment import (
    TensorAugment,
    mix32,
    mix32_int,
    view_hash,
    view_seed,
)
from kd_lightning.errors import ConfigError

N_DRAWS = 2000  # augmented copies per path in the statistics tests
PIL_AUG = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]  # CIFAR's training recipe


def test_hash_is_identical_on_python_ints_and_tensors():
    x = torch.randint(0, 2**32, (2000,), dtype=torch.int64)
    assert [int(v) for v in mix32(x)] == [mix32_int(int(v)) for v in x]
    index, view = torch.arange(500), torch.arange(500) % 7
    assert [int(h) for h in view_hash(3, index, view)] == [
        view_seed(3, i, v) for i, v in zip(range(500), (view % 7).tolist())
    ]


def _coordinate_image() -> torch.Tensor:
    """A 32×32 RGB image whose pixels encode their own position (R: column, G: row), with
    no 0 values, so crop offsets and flips can be read back from any augmented copy."""
    ar = torch.arange(32)
    img = torch.empty(32, 32, 3, dtype=torch.uint8)
    img[..., 0] = (4 + 7 * ar).view(1, 32)
    img[..., 1] = (4 + 7 * ar).view(32, 1)
    img[..., 2] = 200
    return img


def _read_params(normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(oy, ox, flipped) of each augmented copy (N, 3, 32, 32) of ``_coordinate_image``."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    pixels = torch.round((normalised * std + mean) * 255).long()
    # the centre pixel (16, 16) of the crop is always an image pixel: padding is only 4 wide
    col = (pixels[:, 0, 16, 16] - 4) // 7
    row = (pixels[:, 1, 16, 16] - 4) // 7
    flipped = pixels[:, 0, 16, 17] < pixels[:, 0, 16, 16]  # columns run backwards
    ox = torch.where(flipped, col - 15, col - 16) + 4  # crop column 16 is padded column ox+16
    oy = row - 16 + 4
    return oy, ox, flipped


def _pil_copies(image: torch.Tensor, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    ds = ArrayImageDataset(
        image.expand(n, -1, -1, -1).contiguous(), torch.zeros(n), None,
        T.Compose([*PIL_AUG, T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]),
        CIFAR10_MEAN, CIFAR10_STD,
    )
    return torch.stack([ds[i]["image"] for i in range(n)])


def _tensor_copies(image: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(1)
    aug = TensorAugment.from_transforms(PIL_AUG, CIFAR10_MEAN, CIFAR10_STD, (32, 32))
    return aug(image.permute(2, 0, 1).expand(n, -1, -1, -1), **kwargs)


def _chi2_uniform(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module")
def copies() -> dict[str, torch.Tensor]:
    """N_DRAWS augmented copies of ``_coordinate_image`` from each path."""
    image, n = _coordinate_image(), N_DRAWS
    views = {"index": torch.arange(n), "view": torch.zeros(n, dtype=torch.long)}
    return {
        "pil": _pil_copies(image, n),
        "tensor": _tensor_copies(image, n),
        "tensor-views": _tensor_copies(image, n, **views),  # view 0 of n different samples
    }


def test_crop_and_flip_statistics_match_the_pil_pipeline(copies):
    n = N_DRAWS
    paths = {name: _read_params(x) for name, x in copies.items()}
    for name, (oy, ox, flipped) in paths.items():
        assert oy.min() == 0 and oy.max() == 8 and ox.min() == 0 and ox.max() == 8, name
        # flip probability 0.5: within 4 standard errors
        assert abs(flipped.float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5, name
        # offsets uniform over the 9×9 grid: χ² with 80 dof below its 99.9% quantile (124.8)
        joint = torch.bincount(oy * 9 + ox, minlength=81).float()
        assert _chi2_uniform(joint) < 124.8, name
        # flips independent of the offset: flipped fraction per column offset ≈ 0.5
        per_col = torch.stack([flipped[ox == k].float().mean() for k in range(9)])
        assert (per_col - 0.5).abs().max() < 0.12, name
    # marginal offset distributions of the two paths agree (total variation distance)
    for axis in (0, 1):
        p = torch.bincount(paths["pil"][axis], minlength=9).float() / n
        q = torch.bincount(paths["tensor"][axis], minlength=9).float() / n
        assert 0.5 * (p - q).abs().sum() < 0.08


def test_per_pixel_mean_and_std_match_the_pil_pipeline(copies):
    # the image varies along both axes, so every crop offset and flip changes each pixel
    pil, tensor = copies["pil"], copies["tensor"]
    # two-sample z-score of every pixel's mean: ~N(0, 1) if the distributions match. (A
    # padding of 3 instead of 4 gives mean |z| ≈ 2.4; a flip probability of 0.3, ≈ 3.3.)
    se = ((pil.var(0) + tensor.var(0)) / N_DRAWS).sqrt().clamp_min(1e-6)
    z = (pil.mean(0) - tensor.mean(0)) / se
    assert z.abs().mean() < 1.0 and z.abs().max() < 5.0
    assert (pil.std(0) - tensor.std(0)).abs().mean() < 0.03
    # same overall normalised statistics
    assert abs(pil.mean().item() - tensor.mean().item()) < 0.01
    assert abs(pil.std().item() - tensor.std().item()) < 0.01


def test_normalisation_is_identical_to_totensor_normalize():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32, 3), generator=g, dtype=torch.uint8)
    reference = ArrayImageDataset(images, torch.zeros(16), None, None, CIFAR10_MEAN, CIFAR10_STD)
    pil = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    expected = torch.stack([pil(img.numpy()) for img in images])
    plain = TensorAugment(CIFAR10_MEAN, CIFAR10_STD)  # no crop, no flip
    out = plain(images.permute(0, 3, 1, 2))
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, reference.normalised(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("raw", [False, True])
def test_views_are_deterministic_per_index_and_view(raw):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 32, 32, 3), generator=g, dtype=torch.uint8)
    transform = None if raw else T.Compose([*PIL_AUG, T.ToTensor()])
    ds = ArrayImageDataset(images, torch.zeros(20), None, transform, views=3, view_seed=5,
                           raw=raw, augmented=True)
    aug = TensorAugment.from_transforms(PIL_AUG, (0.0,) * 3, (1.0,) * 3, (32, 32), seed=5)

    def draw(view: int) -> torch.Tensor:
        torch.manual_seed(view * 100 + 7)  # global RNG state must not matter
        batch = ds.get_batch([(i, view) for i in range(20)])
        assert batch["view"].tolist() == [view] * 20
        return aug(batch["image"], batch["index"], batch["view"]) if raw else batch["image"]

    first, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(first, again)
    assert (first != other).flatten(1).any(1).float().mean() > 0.8  # views differ
    single = ds[(4, 1)]["image"]  # per-item access gives the batch's image
    assert torch.equal(aug(single[None], torch.tensor([4]), torch.tensor([1]))[0] if raw else single,
                       first[4])


def test_random_augmentation_reports_view_minus_one_and_plain_data_view_zero():
    images = torch.zeros(4, 8, 8, 1, dtype=torch.uint8)
    augmented = ArrayImageDataset(images, torch.zeros(4), None, T.Compose([T.ToTensor()]))
    plain = ArrayImageDataset(images, torch.zeros(4), None, None, views=3)
    assert augmented[0]["view"] == -1 and augmented.get_batch([0, 1])["view"].tolist() == [-1, -1]
    assert plain[(1, 2)]["view"] == 0 and plain.get_batch([(0, 2)])["view"].tolist() == [0]


def test_unsupported_augmentations_are_refused():
    with pytest.raises(ConfigError, match="augment_on_device.*ColorJitter"):
        TensorAugment.from_transforms([T.ColorJitter(0.1)], (0.0,), (1.0,), (32, 32))
    with pytest.raises(ConfigError, match="RandomCrop"):
        TensorAugment.from_transforms([T.RandomCrop(24, padding=4)], (0.0,), (1.0,), (32, 32))
    with pytest.raises(ConfigError, match="augment_views"):
        CIFAR10DataModule(augment_views=-1)


def test_datamodule_on_device_path(cifar10_root):
    dm = CIFAR10DataModule(data_dir=str(cifar10_root), batch_size=32, augment_on_device=True,
                           augment_views=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == -(-len(dm.train_set) // 32)
    loader.sampler.set_epoch(3)
    raw = next(iter(loader))
    assert raw["image"].dtype == torch.uint8 and raw["image"].shape == (32, 3, 32, 32)
    assert raw["view"].tolist() == [1] * 32  # epoch 3 → view 3 % 2
    batch = dm.on_after_batch_transfer(dict(raw), 0)
    assert batch["image"].dtype == torch.float32
    again = dm.on_after_batch_transfer(dict(raw), 0)
    assert torch.equal(batch["image"], again["image"])  # deterministic views
    # val/test stay normalised on the host and pass through untouched
    val = next(iter(dm.val_dataloader()))
    assert val["image"].dtype == torch.float32
    assert dm.on_after_batch_transfer(val, 0)["image"] is val["image"]
