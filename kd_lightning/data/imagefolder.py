"""ImageNet-scale image data: class folders of JPEG files, decoded as they are read.

``ImageFolderDataModule`` reads torchvision's ImageFolder layout (``<root>/<split>/<class>/
<image>``); ImageNet is one config of it (``configs/data/imagenet.yaml``). Nothing is held
in memory but the file list, so it scales to ILSVRC-2012's 1.28M training images.

Transforms are the standard ImageNet ones (torchvision's reference recipe, also mdistiller's
``imagenet`` loader): training = ``RandomResizedCrop(224, scale=(0.08, 1))`` + horizontal
flip; evaluation = ``Resize(256)`` + ``CenterCrop(224)``; ImageNet mean/std.

Two training data paths, the same augmentation distribution:

* PIL (default): DataLoader workers open, crop, resize, flip and normalise each image.
* ``augment_on_device``: workers only read the encoded file bytes; the batch is decoded on
  the training device (``torchvision.io.decode_jpeg(device="cuda")`` on a GPU, the CPU
  decoder otherwise), then cropped, resized, flipped and normalised there
  (``DeviceImageAugment``). This is the ImageNet form of the on-device path of
  ``kd_lightning.data.tensor_augment``: decoding and resizing leave the CPU workers.

Crop parameters come from ``crop_params`` with a per-sample generator, so with
``augment_views: K`` the crop and flip of (sample, view) are a function of (seed, sample,
view) on both paths (what the teacher cache and the on-disk teacher store need), and with
``augment_views: 0`` they are drawn fresh.

Bad data is reported, not worked around: an empty class folder, train/val folders with
different class lists, or a file that cannot be decoded stop the run with a ``ConfigError``
naming the folder or file. (Conversion to LitData, ``kd-lightning data optimize``, is the
place to clean a dataset: it decodes every image once, skips unreadable ones and counts
them.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from kd_lightning.data.datasets import stratified_split
from kd_lightning.data.resume import ResumableTrainOrder, training_seed
from kd_lightning.data.tensor_augment import view_seed
from kd_lightning.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- augmentation parameters ----------------------------------------------------------------
@dataclass(frozen=True)
class CropSpec:
    """The ImageNet transforms, as numbers (torchvision's defaults).

    ``size``: the square crop fed to the network; ``scale``/``ratio``: RandomResizedCrop's
    area fraction and aspect-ratio ranges; ``flip_p``: horizontal-flip probability;
    ``resize``: the shorter side before the evaluation center crop.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    resize: int = 256

    def check(self, prefix: str = "data") -> None:
        if self.size < 1 or self.resize < self.size:
            raise ConfigError(
                f"{prefix}.resize_size", self.resize,
                f"use image_size >= 1 and resize_size >= image_size ({self.size})",
            )
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"{prefix}.crop_scale", self.scale, "use 0 < min <= max <= 1, e.g. [0.08, 1.0]")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"{prefix}.crop_ratio", self.ratio, "use 0 < min <= max, e.g. [0.75, 1.333]")


def sample_generator(seed: int, index: int, view: int) -> torch.Generator | None:
    """The generator of one sample's augmentation: seeded by (seed, index, view) for a
    deterministic view (``view >= 0``), else None (= torch's global RNG: fresh draws)."""
    if view < 0:
        return None
    return torch.Generator().manual_seed(view_seed(seed, index, view))


def crop_params(
    height: int, width: int, spec: CropSpec, generator: torch.Generator | None
) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, flip) of one RandomResizedCrop + flip.

    The algorithm of ``torchvision.transforms.RandomResizedCrop.get_params`` (10 tries of
    a random area and log-uniform aspect ratio, then a center crop clamped to ``ratio``),
    drawing from ``generator`` so that a view is reproducible.
    """
    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    u = torch.rand(10, 4, generator=generator).tolist()
    flip = bool(torch.rand(1, generator=generator).item() < spec.flip_p)
    for a, r, y, x in u:
        target = area * (spec.scale[0] + a * (spec.scale[1] - spec.scale[0]))
        aspect = math.exp(log_ratio[0] + r * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(y * (height - h + 1)), int(x * (width - w + 1)), h, w, flip
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (…, C, H, W) → float, (x/255 − mean)/std."""
    m = torch.tensor(mean, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device).view(-1, 1, 1)
    return (x.float() / 255.0 - m) / s


def train_image(
    image: Tensor, spec: CropSpec, mean: Sequence[float], std: Sequence[float],
    generator: torch.Generator | None, augment: bool = True,
) -> Tensor:
    """One decoded uint8 (C, H, W) image → its normalised training crop."""
    if not augment:
        return eval_image(image, spec, mean, std)
    top, left, h, w, flip = crop_params(image.shape[-2], image.shape[-1], spec, generator)
    crop = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size], antialias=True)
    return _normalise(crop.flip(-1) if flip else crop, mean, std)


def eval_image(image: Tensor, spec: CropSpec, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Resize (shorter side ``spec.resize``) + center crop ``spec.size``, normalised."""
    x = TF.resize(image, [spec.resize], antialias=True)
    return _normalise(TF.center_crop(x, [spec.size, spec.size]), mean, std)


def decode(data: Tensor | np.ndarray | bytes, name: object, device: torch.device | str = "cpu") -> Tensor:
    """Encoded image bytes → uint8 RGB (3, H, W); ``name`` (a path or sample index) is
    what the error names when the bytes are not a readable image."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if isinstance(data, bytes):
        data = np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    data = data.cpu()
    try:
        if torch.device(device).type == "cuda" and _is_jpeg(data):
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return decode_image(data, mode=ImageReadMode.RGB).to(device)
    except RuntimeError as err:
        raise ConfigError(
            "data", str(name),
            f"not a readable image ({str(err).splitlines()[0]}): delete or replace the file, or "
            "convert the dataset with `kd-lightning data optimize`, which skips and counts "
            "unreadable images",
        ) from None


def _decode_batch_on_gpu(encoded: Sequence[Tensor], device: torch.device) -> list[Tensor] | None:
    """All JPEGs of a batch in one batched nvJPEG call on a CUDA device; None elsewhere, or
    when one of them is not a JPEG or fails (then each is decoded alone, and the bad one named)."""
    if device.type != "cuda":
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    if not all(_is_jpeg(d) for d in encoded):
        return None
    try:
        return decode_jpeg([d.cpu() for d in encoded], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _is_jpeg(data: Tensor) -> bool:
    return len(data) > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


class DeviceImageAugment:
    """Decode + RandomResizedCrop + flip + normalise a batch of encoded images on the
    batch's device (the ImageNet on-device path).

    Crops differ in size, so each image is resized on its own; the batch is stacked at the
    network's input size and normalised in one op.
    """

    def __init__(
        self, spec: CropSpec, mean: Sequence[float], std: Sequence[float], seed: int = 0,
        augment: bool = True,
    ) -> None:
        self.spec, self.mean, self.std, self.seed, self.augment = spec, tuple(mean), tuple(std), seed, augment

    def __call__(
        self, encoded: Sequence[Tensor], index: Tensor, view: Tensor, names: Sequence[object] | None = None,
    ) -> Tensor:
        device = index.device
        decoded = _decode_batch_on_gpu(encoded, device)
        crops = []
        for k, (data, i, v) in enumerate(zip(encoded, index.tolist(), view.tolist())):
            image = decoded[k] if decoded is not None else decode(
                data, names[k] if names is not None else f"sample index {i}", device
            )
            if not self.augment:
                x = TF.center_crop(TF.resize(image, [self.spec.resize], antialias=True), [self.spec.size] * 2)
            else:
                gen = sample_generator(self.seed, i, v)
                top, left, h, w, flip = crop_params(image.shape[-2], image.shape[-1], self.spec, gen)
                x = TF.resized_crop(image, top, left, h, w, [self.spec.size] * 2, antialias=True)
                x = x.flip(-1) if flip else x
            crops.append(x)
        return _normalise(torch.stack(crops), self.mean, self.std)


# -- the file list ----------------------------------------------------------------------------
def list_classes(folder: Path, field: str) -> list[str]:
    """Sorted class-folder names of an ImageFolder split (one line of error if unusable)."""
    if not folder.is_dir():
        raise ConfigError(
            field, str(folder),
            "no such folder: expected the ImageFolder layout <data_dir>/<split>/<class>/<image> "
            "(for ImageNet: extract ILSVRC2012_img_train.tar and the val images sorted into class "
            "folders there)",
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(field, str(folder), "it holds no class folders: expected <split>/<class>/<image>")
    return classes


def list_images(folder: Path, classes: Sequence[str], field: str) -> list[tuple[str, int]]:
    """(path, label) of every image, sorted by class then file name: the order, and hence
    each sample's ``index``, is the same on every machine."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            e.path for e in os.scandir(folder / name)
            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
        )
        if not files:
            raise ConfigError(
                field, str(folder / name),
                f"the class folder holds no images ({', '.join(IMG_EXTENSIONS)}): add images or "
                "remove the folder (a class without training images cannot be learned)",
            )
        samples.extend((f, label) for f in files)
    return samples


def check_same_classes(train: Sequence[str], other: Sequence[str], field: str, folder: Path) -> None:
    if list(train) != list(other):
        only_train = sorted(set(train) - set(other))[:5]
        only_other = sorted(set(other) - set(train))[:5]
        raise ConfigError(
            field, str(folder),
            f"its class folders differ from the training split's ({len(other)} vs {len(train)}; "
            f"only in train: {only_train}, only here: {only_other}): labels would not mean the "
            "same class; give both splits the same class folders",
        )


class ImageFileDataset(Dataset):
    """Images read from files, one dict per sample: ``{"image", "label", "index", "view"}``.

    ``mode``: ``train`` (random-resized crop + flip, seeded per (index, view) when
    ``views`` > 0), ``eval`` (resize + center crop) or ``encoded`` (the raw file bytes as a
    1-D uint8 tensor, for ``DeviceImageAugment``). ``index`` is the position in the split's
    sorted file list (stable), and ``dataset[i, view]`` is what the view sampler asks for.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        indices: Tensor | None,
        mode: Literal["train", "eval", "encoded"],
        spec: CropSpec,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        views: int = 0,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.indices = torch.arange(len(self.samples)) if indices is None else indices
        self.mode, self.spec, self.mean, self.std = mode, spec, tuple(mean), tuple(std)
        self.views, self.seed = int(views), int(seed)
        self.augmented = augment and mode != "eval"

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, view = key if isinstance(key, tuple) else (key, 0)
        src = int(self.indices[i])
        view = (view if self.views else -1) if self.augmented else 0
        path, label = self.samples[src]
        if self.mode == "encoded":
            with open(path, "rb") as fh:
                image = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)
        else:
            image = self._load(path)
            if self.mode == "train":
                gen = sample_generator(self.seed, src, view)
                image = train_image(image, self.spec, self.mean, self.std, gen, self.augmented)
            else:
                image = eval_image(image, self.spec, self.mean, self.std)
        return {"image": image, "label": torch.tensor(label), "index": torch.tensor(src),
                "view": torch.tensor(view)}

    @staticmethod
    def _load(path: str) -> Tensor:
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ConfigError(
                "data", path,
                f"not a readable image ({type(err).__name__}: {err}): delete or replace the file, "
                "or convert the dataset with `kd-lightning data optimize`, which skips and counts "
                "unreadable images",
            ) from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except encoded images (different lengths) stay a list."""
    if items and items[0]["image"].ndim == 1:
        rest = default_collate([{k: v for k, v in it.items() if k != "image"} for it in items])
        return {"image": [it["image"] for it in items], **rest}
    return default_collate(items)


class ImageDataMixin(ResumableTrainOrder):
    """What the ImageFolder and streaming DataModules share: the ImageNet transforms, the
    on-device path, the teacher-cache contract and the model links."""

    vocab_sizes: dict[str, int] | None = None
    num_classes: int
    input_shape: tuple[int, int, int]
    batch_size: int

    def _init_images(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        seed: int,
        image_size: int,
        resize_size: int,
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        augment: bool,
        augment_on_device: bool,
        augment_views: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value <= 0:
                raise ConfigError(f"data.{field}", value, "use a batch size of at least 1")
        if num_workers < 0:
            raise ConfigError("data.num_workers", num_workers, "use 0 or more workers")
        if augment_views < 0:
            raise ConfigError("data.augment_views", augment_views, "use 0 (random augmentation) or K >= 1 views")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError("data.std", std, "give 3 channel means and 3 positive stds")
        self.spec = CropSpec(image_size, tuple(crop_scale), tuple(crop_ratio), 0.5, resize_size)
        self.spec.check()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.augment, self.augment_on_device, self.augment_views = augment, augment_on_device, augment_views
        self.mean, self.std = tuple(mean), tuple(std)
        self.input_shape = (3, image_size, image_size)
        #: the on-device augmenter of training batches (``augment_on_device``)
        self.device_augment: DeviceImageAugment | None = None

    @property
    def view_seed(self) -> int:
        """The seed of the deterministic views: follows ``seed_everything`` like KDDataModule."""
        return training_seed(self.seed)

    @property
    def augments_randomly(self) -> bool:
        """Whether a training image can look different every time it is drawn (so no
        per-sample teacher output can be cached or stored)."""
        return self.augment and not self.augment_views

    @property
    def augmentation_signature(self) -> dict[str, Any]:
        """Everything that decides what training view (index, v) looks like: the on-disk
        teacher store records it and refuses data whose views differ."""
        return {
            "transform": "random_resized_crop+flip" if self.augment else "resize+center_crop",
            **asdict(self.spec), "views": self.augment_views if self.augment else 1,
            "seed": self.view_seed, "mean": list(self.mean), "std": list(self.std),
        }

    def _train_mode(self) -> Literal["train", "encoded"]:
        if self.augment_on_device:
            self.device_augment = DeviceImageAugment(self.spec, self.mean, self.std, self.view_seed, self.augment)
            return "encoded"
        return "train"

    def _names(self, batch: dict[str, Any]) -> list[object] | None:
        return None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # encoded images stay on the host: the GPU decoder reads host bytes itself
        if isinstance(batch, dict) and isinstance(batch.get("image"), list):
            rest = super().transfer_batch_to_device(  # type: ignore[misc]
                {k: v for k, v in batch.items() if k != "image"}, device, dataloader_idx
            )
            return {"image": batch["image"], **rest}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.seed_step_rng()  # training randomness = f(seed, batch number): exact resume
        if isinstance(batch, dict) and isinstance(batch.get("image"), list):
            augment = self.device_augment or DeviceImageAugment(
                self.spec, self.mean, self.std, self.view_seed, self.augment
            )
            batch["image"] = augment(batch["image"], batch["index"], batch["view"], self._names(batch))
        return batch

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate_images,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0, drop_last=False,
        )


class ImageFolderDataModule(ImageDataMixin, L.LightningDataModule):
    """Class folders of images: ``<data_dir>/<train_dir>/<class>/*.JPEG`` (torchvision
    ImageFolder layout), with the standard ImageNet transforms.

    Args:
        data_dir: the dataset root.
        train_dir: the training split, relative to ``data_dir``.
        val_dir: the validation split (ImageNet: ``val`` sorted into class folders); None =
            hold out ``val_fraction`` of the training split (stratified, seeded by ``seed``).
        test_dir: the test split; None = the validation split (ImageNet reports top-1 on val).
        val_fraction: share of the training split held out when ``val_dir`` is None.
        batch_size, eval_batch_size: per-process batch sizes (eval defaults to ``batch_size``).
        num_workers, pin_memory: DataLoader settings (decoding runs in the workers).
        seed: seed of the held-out split (and of the views when there is no
            ``seed_everything``).
        image_size: the training/eval crop (224); ``resize_size``: the shorter side before
            the eval center crop (256).
        crop_scale, crop_ratio: RandomResizedCrop's area and aspect-ratio ranges.
        augment: RandomResizedCrop + flip for training (false: the eval transform).
        augment_on_device: the workers read bytes only; decode (on the GPU with
            ``decode_jpeg`` when training on one), crop, resize, flip and normalise the
            batch on the training device.
        augment_views: 0 = fresh random crops; K > 0 = K fixed views per image, view
            ``epoch % K`` in each epoch (for ``model.teacher_cache`` and the teacher store).
        mean, std: per-channel normalisation (ImageNet's by default).
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        train_dir: str = "train",
        val_dir: str | None = "val",
        test_dir: str | None = None,
        val_fraction: float = 0.01,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = False,
        seed: int = 0,
        image_size: int = 224,
        resize_size: int = 256,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        augment: bool = True,
        augment_on_device: bool = False,
        augment_views: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self._init_images(
            batch_size, eval_batch_size, num_workers, pin_memory, seed, image_size, resize_size,
            crop_scale, crop_ratio, augment, augment_on_device, augment_views, mean, std,
        )
        if val_dir is None and not 0.0 < val_fraction < 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "use a fraction in (0, 1), e.g. 0.01")
        self.data_dir, self.train_dir, self.val_dir, self.test_dir = data_dir, train_dir, val_dir, test_dir
        self.val_fraction = val_fraction
        root = Path(data_dir)
        if not root.is_dir():  # name what the user set, not the train_dir default under it
            raise ConfigError(
                "data.data_dir", str(data_dir),
                "no such folder: expected the ImageFolder layout <data_dir>/<split>/<class>/<image>",
            )
        # the class list (not the file list) now: the CLI links num_classes into the model
        self.classes = list_classes(root / train_dir, "data.train_dir")
        self.num_classes = len(self.classes)
        self.train_set: ImageFileDataset | None = None
        self.val_set: ImageFileDataset | None = None
        self.test_set: ImageFileDataset | None = None

    def _split(self, name: str | None, field: str) -> list[tuple[str, int]]:
        folder = Path(self.data_dir) / str(name)
        check_same_classes(self.classes, list_classes(folder, field), field, folder)
        return list_images(folder, self.classes, field)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = list_images(Path(self.data_dir) / self.train_dir, self.classes, "data.train_dir")
        seed, args = self.view_seed, (self.spec, self.mean, self.std)
        if self.val_dir is None:
            labels = torch.tensor([label for _, label in train])
            train_idx, val_idx = stratified_split(labels, [self.val_fraction], self.seed)
            if len(val_idx) == 0:
                raise ConfigError(
                    "data.val_fraction", self.val_fraction,
                    f"it holds out no image of the {len(train)}: raise it or give data.val_dir",
                )
            val = ImageFileDataset(train, val_idx, "eval", *args)
        else:
            train_idx = None
            val = ImageFileDataset(self._split(self.val_dir, "data.val_dir"), None, "eval", *args)
        self.train_set = ImageFileDataset(
            train, train_idx, self._train_mode(), *args, self.augment_views, seed, self.augment
        )
        self.val_set = val
        self.test_set = (
            val if self.test_dir is None
            else ImageFileDataset(self._split(self.test_dir, "data.test_dir"), None, "eval", *args)
        )

    def _names(self, batch: dict[str, Any]) -> list[object] | None:
        samples = self.train_set.samples if self.train_set is not None else None
        return None if samples is None else [samples[int(i)][0] for i in batch["index"]]

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler(self.train_set, self.augment_views, self.seed)
        return self._loader(self.train_set, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
