"""Tensor-side augmentation on the training device, and deterministic augmentation views.

Two pieces that make the data path fast and the teacher cache correct:

* ``TensorAugment`` applies random-crop (zero or reflect padding) + horizontal flip + normalisation to
  a whole uint8 batch at once, on whatever device the batch is on. It replaces the
  per-image PIL pipeline (``Image.fromarray`` → ``RandomCrop`` → ``ToTensor`` →
  ``Normalize`` in DataLoader workers) with three batched tensor ops after the host→device
  copy, which also moves 4× fewer bytes (uint8 instead of fp32).
* *Augmentation views*: with ``augment_views = K`` the crop/flip of sample ``i`` in epoch
  ``e`` is a pure function of ``(seed, i, e % K)``. The model still sees K different
  augmentations of every image, but the same K every time, so a frozen teacher's output
  for ``(i, view)`` can be computed once and cached (``kd_lightning.modules.teacher_cache``).
  The train sampler (``kd_lightning.data.resume.ResumableSampler``) pairs every sampled
  index with the epoch's view; datasets yield it as ``batch["view"]`` (-1 when the
  augmentation is fresh random, 0 when there is none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from kd_lightning.errors import ConfigError

_M32 = 0xFFFFFFFF


# -- deterministic per-sample randomness ------------------------------------------------
# A 32-bit integer hash (Wellons' "lowbias32"), written twice: on Python ints for per-sample
# PIL augmentation in DataLoader workers, and on int64 tensors for whole batches on any
# device. Both produce identical values (tested), so a view means the same thing everywhere.
def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for int64 tensors holding uint32 values, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor) -> Tensor:
    """lowbias32 on an int64 tensor of uint32 values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (same values as ``mix32``)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def view_hash(seed: int, index: Tensor, view: Tensor) -> Tensor:
    """One uint32 (as int64) per sample, a function of (seed, index, view) only."""
    h = mix32(torch.full_like(index, mix32_int(seed)) ^ (index & _M32))
    return mix32(h ^ (view & _M32))


def view_seed(seed: int, index: int, view: int) -> int:
    """``view_hash`` for one sample: seeds the RNG of a PIL pipeline for view ``view``."""
    return mix32_int(mix32_int(mix32_int(seed) ^ (index & _M32)) ^ (view & _M32))


# -- batched crop / flip / normalise -------------------------------------------------------
class TensorAugment:
    """Random-crop with zero or reflect padding, horizontal flip and normalisation of a uint8 batch.

    Matches torchvision's ``RandomCrop(size, padding=p, padding_mode=...)`` (offsets uniform
    in ``[0, 2p]``; padding pixels are 0 before normalisation, or the image mirrored without
    repeating its edge for ``reflect``, KD-Zoo's CIFAR recipe) followed by
    ``RandomHorizontalFlip(flip_p)``, ``ToTensor`` and ``Normalize(mean, std)``.

    Args:
        mean, std: per-channel normalisation, as for ``T.Normalize`` (on [0, 1] pixels).
        padding: padding of the random crop (0: no crop).
        padding_mode: ``constant`` (zeros) or ``reflect``.
        flip_p: probability of a horizontal flip (0: no flip).
        seed: seed of the deterministic views (``view >= 0`` in ``__call__``).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 0,
        flip_p: float = 0.0,
        seed: int = 0,
        padding_mode: str = "constant",
    ) -> None:
        if padding < 0:
            raise ConfigError("TensorAugment.padding", padding, "use a padding >= 0")
        if padding_mode not in ("constant", "reflect"):
            raise ConfigError("TensorAugment.padding_mode", padding_mode, "use constant or reflect")
        self.padding_mode = padding_mode
        if not 0.0 <= flip_p <= 1.0:
            raise ConfigError("TensorAugment.flip_p", flip_p, "use a probability in [0, 1]")
        std_t = torch.tensor(std, dtype=torch.float32)
        # x/255 normalised = x·scale + shift: one fused multiply-add per pixel
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1)
        self.padding, self.flip_p, self.seed = int(padding), float(flip_p), int(seed)

    @property
    def augments(self) -> bool:
        """Whether it changes anything beyond normalisation."""
        return self.padding > 0 or self.flip_p > 0

    @classmethod
    def from_transforms(
        cls,
        transforms: Sequence[object],
        mean: Sequence[float],
        std: Sequence[float],
        image_size: tuple[int, int],
        seed: int = 0,
        field: str = "data.augment_on_device",
    ) -> TensorAugment:
        """The tensor equivalent of a DataModule's PIL ``augmentations()`` list.

        Only ``RandomCrop`` (at the image size, constant 0 fill or reflect padding) and
        ``RandomHorizontalFlip`` have tensor equivalents; anything else is refused rather
        than silently dropped.
        """
        padding, flip_p, mode = 0, 0.0, "constant"
        for t in transforms:
            if isinstance(t, T.RandomCrop):
                pad = t.padding if t.padding is not None else 0
                pads = {pad} if isinstance(pad, int) else set(pad)
                if (
                    tuple(t.size) != tuple(image_size) or len(pads) != 1 or t.pad_if_needed
                    or t.padding_mode not in ("constant", "reflect")
                    or (t.padding_mode == "constant" and t.fill not in (0, (0,), None))
                ):
                    raise ConfigError(
                        field, True,
                        f"{t!r} has no on-device equivalent (only RandomCrop at the image size "
                        "with one zero or reflect padding): set data.augment_on_device=false",
                    )
                padding, mode = pads.pop(), t.padding_mode
            elif isinstance(t, T.RandomHorizontalFlip):
                flip_p = float(t.p)
            else:
                raise ConfigError(
                    field, True,
                    f"the dataset's augmentation {type(t).__name__} has no on-device equivalent "
                    "(supported: RandomCrop, RandomHorizontalFlip): set data.augment_on_device=false",
                )
        return cls(mean, std, padding, flip_p, seed, mode)

    def params(
        self, n: int, device: torch.device, index: Tensor | None = None, view: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Crop offsets (y, x) in ``[0, 2·padding]`` and flip flags, one per sample.

        Samples with ``view >= 0`` get the parameters of that deterministic view; the rest
        (or all, without ``index``/``view``) draw them from the device's global RNG.
        """
        span = 2 * self.padding + 1
        fixed = None if index is None or view is None else view >= 0
        n_fixed = 0 if fixed is None else int(fixed.sum())
        if n_fixed < n:
            oy = torch.randint(0, span, (n,), device=device)
            ox = torch.randint(0, span, (n,), device=device)
            flip = torch.rand(n, device=device) < self.flip_p
        if n_fixed:  # hashing costs more than drawing: only for samples that need it
            h = view_hash(self.seed, index.long(), view.long().clamp_min(0))
            u = [mix32(h + k) for k in (1, 2, 3)]  # three independent draws per sample
            f_oy, f_ox = u[0] % span, u[1] % span
            f_flip = u[2].double() / 2**32 < self.flip_p
            if n_fixed == n:
                return f_oy, f_ox, f_flip
            oy, ox = torch.where(fixed, f_oy, oy), torch.where(fixed, f_ox, ox)
            flip = torch.where(fixed, f_flip, flip)
        return oy, ox, flip

    def __call__(
        self, images: Tensor, index: Tensor | None = None, view: Tensor | None = None
    ) -> Tensor:
        """uint8 (N, C, H, W) → augmented, normalised float32 (N, C, H, W)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if self.augments:  # (reads NHWC-strided input directly: cheaper than a copy first)
            images = self._crop_flip(images, *self.params(len(images), images.device, index, view))
        images = images.contiguous()  # NCHW, as every model expects (a uint8 copy is cheap)
        return torch.addcmul(self.shift.to(images.device), images.float(), self.scale.to(images.device))

    def _crop_flip(self, x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor) -> Tensor:
        n, _, h, w = x.shape
        p = self.padding
        if p and self.padding_mode == "reflect":  # by index: reflection_pad has no uint8 kernel
            x = x[:, :, _reflect_index(h, p, x.device)][:, :, :, _reflect_index(w, p, x.device)]
        elif p:
            x = F.pad(x, (p, p, p, p))
        # All (2p+1)² crops of every image as a strided view (no copy), then one gather
        # of the chosen crop per image: much cheaper than per-axis index gathers.
        windows = x.unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 2p+1, 2p+1, H, W)
        crops = windows[torch.arange(n, device=x.device), :, oy, ox]  # (N, C, H, W)
        if self.flip_p > 0:
            crops = torch.where(flip[:, None, None, None], crops.flip(3), crops)
        return crops


def _reflect_index(size: int, p: int, device: torch.device) -> Tensor:
    """Source rows of a reflect-padded axis: -p..size+p-1 mirrored at 0 and size-1 (the
    edge is not repeated, as in ``F.pad(mode="reflect")`` and torchvision)."""
    idx = torch.arange(-p, size + p, device=device).abs()
    return torch.where(idx >= size, 2 * (size - 1) - idx, idx)


# -- batched fetching ----------------------------------------------------------------------
class BatchFetch(Dataset):
    """Wraps a dataset with ``get_batch(keys)`` so a DataLoader fetches whole batches.

    PyTorch's fetcher calls ``__getitems__`` with all keys of a batch; this returns the
    finished batch and ``collate_batch`` passes it through, so no per-image items are
    built and stacked. Used by ``KDDataModule`` for the raw uint8 training set of the
    on-device path (the wrapper, not the dataset, so loaders users build over
    ``datamodule.train_set`` keep the standard per-item behaviour).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[key]

    def __getitems__(self, keys: list[Any]) -> dict[str, Tensor]:
        return self.dataset.get_batch(keys)  # type: ignore[attr-defined]


def collate_batch(data: Any) -> Any:
    """``default_collate``, except that batches ``BatchFetch`` already built pass through."""
    return data if isinstance(data, dict) else default_collate(data)
