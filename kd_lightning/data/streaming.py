"""Image datasets in LitData's chunked streaming format: conversion and a DataModule.

``kd-lightning data optimize`` (``kd_lightning.data.commands``) writes an ImageFolder tree
or any kd-lightning image DataModule with ``litdata.optimize`` into::

    <output_dir>/train/  chunk-*.bin + index.json    (LitData's own layout, one per split)
    <output_dir>/val/    ...
    <output_dir>/kd_lightning.json                   (classes, counts, skipped files)

Each sample is ``{"image": encoded bytes (uint8 array), "label": int, "index": int}``:
ImageFolder JPEGs are stored as their original file bytes (no re-encoding), in-memory
arrays as lossless PNG (read back as RGB); ``index`` is the sample's index in the source DataModule, so a
teacher store or CRD memory bank built on the ImageFolder keys the same samples here.

``StreamingImageDataModule`` reads it with ``litdata.StreamingDataset`` and
``StreamingDataLoader`` from a local directory or an object-store URL (``s3://…``,
``gs://…``; chunks are cached under ``cache_dir``). LitData's conventions, not a home-made
scheme: it assigns chunks to DDP ranks and DataLoader workers (every rank and node sees a
disjoint share of the shuffled stream), reshuffles every epoch from ``seed``, and the
``StreamingDataLoader``'s ``state_dict`` — which Lightning saves in every checkpoint and
restores on ``--ckpt_path`` — lets a resumed fit continue its stream where it stopped (and,
through ``ResumedStreamLoader``, start every later epoch afresh). A stream has no per-step
RNG seeding, so a resumed fit repeats the uninterrupted one exactly with deterministic
views (``augment_views`` > 0, or ``augment: false``), not with fresh-random crops.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from kd_lightning.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSpec,
    ImageDataMixin,
    decode,
    eval_image,
    sample_generator,
    train_image,
)
from kd_lightning.errors import ConfigError

META_FILE = "kd_lightning.json"
SPLITS = ("train", "val", "test")


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


# -- writing ----------------------------------------------------------------------------------
class EncodeSample:
    """``litdata.optimize``'s per-input function: one source sample → one stored item.

    Inputs are ``(index, label, path)`` for image files (the bytes are stored as they are,
    after one decode to check them) or ``(index, label, array)`` rows of an in-memory
    DataModule (stored as PNG). An image that cannot be decoded is skipped (a generator
    that yields nothing) and named on stderr; the caller counts what is missing.
    """

    def __call__(self, item: tuple[int, int, Any]) -> Iterator[dict[str, Any]]:
        from torchvision.io import ImageReadMode, decode_image, encode_png

        index, label, source = item
        if isinstance(source, str):
            with open(source, "rb") as fh:
                data = np.frombuffer(fh.read(), dtype=np.uint8)
            try:
                decode_image(torch.from_numpy(data.copy()), mode=ImageReadMode.RGB)
            except RuntimeError as err:
                print(f"kd-lightning data optimize: skipped unreadable {source}: {err}", file=sys.stderr)
                return
        else:  # uint8 (H, W, C)
            data = encode_png(torch.as_tensor(source).permute(2, 0, 1).contiguous()).numpy()
        yield {"image": data, "label": int(label), "index": int(index)}


def split_inputs(datamodule: Any, split: str) -> list[tuple[int, int, Any]] | None:
    """The ``(index, label, source)`` inputs of a set-up DataModule's split, or None if it
    has none (e.g. a test split that is the val split)."""
    ds = getattr(datamodule, f"{split}_set", None)
    if ds is None or (split == "test" and ds is getattr(datamodule, "val_set", None)):
        return None
    indices = [int(i) for i in ds.indices]
    if hasattr(ds, "samples"):  # ImageFileDataset: files on disk
        return [(i, ds.samples[i][1], ds.samples[i][0]) for i in indices]
    if hasattr(ds, "images") and hasattr(ds, "labels"):  # ArrayImageDataset: uint8 NHWC rows
        labels = ds.labels
        return [(i, int(labels[i]), ds.images[i]) for i in indices]
    raise ConfigError(
        "optimize.data", type(datamodule).__name__,
        f"its {split}_set is neither an ImageFolder file list nor an in-memory image array; "
        "only image DataModules can be converted",
    )


def items_per_chunk(inputs: Sequence[tuple[int, int, Any]], chunk_bytes: int | str) -> int:
    """``chunk_bytes`` as a number of items, from the sources' mean size: the file size of
    an image file, the raw array size of an in-memory row (an upper bound of its PNG).

    The mean is taken over at most 1000 evenly spaced inputs, so the count depends on the
    inputs only, never on the worker count.
    """
    from litdata.utilities.format import _convert_bytes_to_int

    try:
        text = str(chunk_bytes).strip()
        limit = int(text) if text.isdigit() else _convert_bytes_to_int(text)
    except ValueError:
        raise ConfigError("--chunk_bytes", chunk_bytes, "use a size such as 64MB, 512KB or 1000000") from None
    picked = inputs[:: max(1, len(inputs) // 1000)]
    sizes = [os.path.getsize(s) if isinstance(s, str) else np.asarray(s).nbytes for _, _, s in picked]
    return max(1, int(limit // max(1.0, float(np.mean(sizes)))))


def optimize_datamodule(
    datamodule: Any,
    output_dir: str,
    num_workers: int = 1,
    chunk_bytes: int | str = "64MB",
    start_method: Literal["fork", "spawn"] | None = "fork",
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Convert every split of ``datamodule`` with ``litdata.optimize``; returns (and
    writes to ``<output_dir>/kd_lightning.json``) the dataset's description.

    The layout does not depend on ``num_workers`` (issue 21, finding 12): LitData's default
    hands the inputs out from a shared queue and cuts chunks by bytes, so the chunks, and
    with them a seeded shuffle, changed with the worker count and from run to run. Here
    chunks hold ``chunk_size`` items (None: ``chunk_bytes`` over the mean source size), and
    each worker encodes whole chunks of the inputs in order (LitData's ``align_chunking``,
    ``keep_data_ordered``; no reordering by file size), so the chunks and their order in
    ``index.json`` equal a one-worker run's; only the file names carry the worker's rank.
    An unreadable image that is skipped shortens its chunk, so the layout after a skip
    depends on the worker count again (the command says so).
    """
    import litdata

    datamodule.setup("fit")
    meta: dict[str, Any] = {
        "num_classes": int(datamodule.num_classes),
        "classes": list(getattr(datamodule, "classes", [])),
        "source": type(datamodule).__name__,
        "splits": {}, "skipped": {}, "index_space": {}, "chunk_size": {},
    }
    for split in SPLITS:
        inputs = split_inputs(datamodule, split)
        if not inputs:
            continue
        target = f"{output_dir.rstrip('/')}/{split}"
        size = chunk_size or items_per_chunk(inputs, chunk_bytes)
        # every worker gets at least one whole chunk (LitData warns of idle workers otherwise)
        workers = max(1, min(num_workers, len(inputs) // size))
        litdata.optimize(
            fn=EncodeSample(), inputs=inputs, output_dir=target, chunk_size=size,
            align_chunking=True, keep_data_ordered=True, reorder_files=False,
            num_workers=workers, mode="overwrite", start_method=start_method,
        )  # litdata's own progress (verbose): a big dataset takes many minutes
        written = len(litdata.StreamingDataset(target)) if not is_remote(target) else len(inputs)
        meta["splits"][split] = written
        meta["skipped"][split] = len(inputs) - written
        meta["chunk_size"][split] = size
        # the size of the array ``index`` points into (teacher stores, CRD banks)
        meta["index_space"][split] = max(i for i, _, _ in inputs) + 1
    if not is_remote(output_dir):
        (Path(output_dir) / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


# -- reading ----------------------------------------------------------------------------------
def _streaming_dataset_class() -> type:
    """``ImageStream``, defined on first use: importing litdata is left to the runs that
    stream (the module ``__getattr__`` below keeps the class picklable for spawned workers)."""
    if "ImageStream" in globals():
        return globals()["ImageStream"]
    from litdata import StreamingDataset

    class ImageStream(StreamingDataset):
        """A LitData stream of encoded images, decoded and transformed in the loader's
        workers (or passed on encoded, for the on-device path).

        The view of a training sample is ``(epoch − 1) % views`` (LitData counts epochs
        from 1), i.e. ``epoch % views`` in Lightning's 0-based count.
        """

        def __init__(
            self, input_dir: str, mode: Literal["train", "eval", "encoded"], spec: CropSpec,
            mean: Sequence[float], std: Sequence[float], views: int, views_seed: int,
            augment: bool, **kwargs: Any,
        ) -> None:
            super().__init__(input_dir, **kwargs)
            self.mode, self.spec, self.mean, self.std = mode, spec, tuple(mean), tuple(std)
            self.views, self.view_seed, self.augment = views, views_seed, augment

        def __getitem__(self, index: Any) -> Any:
            item = super().__getitem__(index)
            if not isinstance(item, dict):  # slices: LitData's own debugging access
                return item
            src = int(item["index"])
            if self.mode == "eval" or not self.augment:
                view = 0
            else:
                view = (self.current_epoch - 1) % self.views if self.views else -1
            data = torch.from_numpy(np.ascontiguousarray(item["image"]))
            if self.mode == "encoded":
                image = data
            else:
                image = decode(data, f"sample index {src} of {self.input_dir.path or self.input_dir.url}")
                if self.mode == "train":
                    gen = sample_generator(self.view_seed, src, view)
                    image = train_image(image, self.spec, self.mean, self.std, gen, self.augment)
                else:
                    image = eval_image(image, self.spec, self.mean, self.std)
            return {"image": image, "label": torch.tensor(item["label"]), "index": torch.tensor(src),
                    "view": torch.tensor(view)}

    ImageStream.__module__, ImageStream.__qualname__ = __name__, "ImageStream"
    globals()["ImageStream"] = ImageStream
    return ImageStream


def _loader_class() -> type:
    """``ResumedStreamLoader``, defined on first use (like ``ImageStream``)."""
    if "ResumedStreamLoader" in globals():
        return globals()["ResumedStreamLoader"]
    from litdata import StreamingDataLoader

    class ResumedStreamLoader(StreamingDataLoader):
        """A ``StreamingDataLoader`` whose restored position lasts one epoch.

        ``load_state_dict`` sets ``restore``, which makes ``__iter__`` continue the saved
        stream instead of starting a new epoch; LitData clears it only when an iteration runs
        to exhaustion. Lightning ends an epoch after its known number of batches without
        exhausting the iterator, so the flag survived the resumed epoch and every later
        epoch replayed the exhausted position: no batches, and the fit stopped short with
        exit 0 (issue 21, finding 1). Here an iteration that starts after a restored one
        has yielded a batch is a new epoch.
        """

        _restored_epoch_ran = False

        def __iter__(self) -> Iterator[Any]:
            if self.restore and self._restored_epoch_ran:
                self.restore = False
            self._restored_epoch_ran = False
            restoring = self.restore
            for batch in super().__iter__():
                self._restored_epoch_ran = restoring
                yield batch

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._restored_epoch_ran = False

    ResumedStreamLoader.__module__, ResumedStreamLoader.__qualname__ = __name__, "ResumedStreamLoader"
    globals()["ResumedStreamLoader"] = ResumedStreamLoader
    return ResumedStreamLoader


def __getattr__(name: str) -> Any:
    if name == "ResumedStreamLoader":
        return _loader_class()
    if name == "ImageStream":
        return _streaming_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StreamingImageDataModule(ImageDataMixin, L.LightningDataModule):
    """Images in LitData's streaming format (written by ``kd-lightning data optimize``),
    with the ImageNet transforms of ``ImageFolderDataModule``.

    Args:
        input_dir: the converted dataset: a local directory or an object-store URL, holding
            ``train/``, ``val/`` and optionally ``test/`` (else test = val).
        num_classes: read from ``<input_dir>/kd_lightning.json`` when None; give it for a
            remote ``input_dir``.
        cache_dir: where LitData caches remote chunks (None: its default).
        max_cache_size: LitData's cache limit, e.g. ``50GB``.
        shuffle: shuffle the training stream (chunks and samples; reshuffled per epoch).
        batch_size, eval_batch_size, num_workers, pin_memory, seed, image_size,
        resize_size, crop_scale, crop_ratio, augment, augment_on_device, augment_views,
        mean, std: as for ``ImageFolderDataModule``. ``seed`` also seeds LitData's shuffle
        (``seed_everything``'s seed wins when set).

    Training batches drop the last incomplete batch (LitData's default under DDP: every
    rank runs the same number of steps).
    """

    def __init__(
        self,
        input_dir: str = "data/imagenet_litdata",
        num_classes: int | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        shuffle: bool = True,
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
        self.input_dir, self.cache_dir, self.max_cache_size = input_dir.rstrip("/"), cache_dir, max_cache_size
        self.shuffle = shuffle
        meta = self._read_meta()
        if num_classes is None:
            if meta is None:
                raise ConfigError(
                    "data.num_classes", None,
                    f"{input_dir} has no {META_FILE} (remote, or not written by `kd-lightning "
                    "data optimize`): give data.num_classes",
                )
            num_classes = int(meta["num_classes"])
        if num_classes < 1:
            raise ConfigError("data.num_classes", num_classes, "use the number of classes (>= 1)")
        self.num_classes = int(num_classes)
        self.splits = set(meta["splits"]) if meta else {"train", "val"}
        #: per split, 1 + the largest sample ``index`` (sizes a teacher store)
        self.index_space: dict[str, int] = dict(meta.get("index_space", {})) if meta else {}
        self.train_set: Any = None
        self.val_set: Any = None
        self.test_set: Any = None
        self._loaders: dict[str, Any] = {}

    def _read_meta(self) -> dict[str, Any] | None:
        if is_remote(self.input_dir):
            return None
        root = Path(self.input_dir.removeprefix("file://"))
        if not (root / "train" / "index.json").is_file():
            raise ConfigError(
                "data.input_dir", self.input_dir,
                "no LitData train split there (train/index.json): convert the dataset first with "
                "`kd-lightning data optimize --data_dir <imagefolder> --output_dir <dir>`",
            )
        meta = None
        for index in [*sorted(root.glob("*/index.json")), root / META_FILE]:
            if not index.is_file():
                continue
            try:  # a truncated file would surface as litdata's raw JSONDecodeError at setup
                parsed = json.loads(index.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(
                    "data.input_dir", self.input_dir,
                    f"{index.relative_to(root)} is not valid JSON ({err}); convert the dataset "
                    "again with `kd-lightning data optimize ... --overwrite`",
                ) from None
            meta = parsed if index.name == META_FILE else meta
        return meta

    def _stream(self, split: str, mode: Literal["train", "eval", "encoded"], shuffle: bool, drop_last: bool) -> Any:
        kwargs: dict[str, Any] = {"shuffle": shuffle, "drop_last": drop_last, "seed": self.view_seed,
                                  "max_cache_size": self.max_cache_size}
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        return _streaming_dataset_class()(
            f"{self.input_dir}/{split}", mode, self.spec, self.mean, self.std,
            self.augment_views, self.view_seed, self.augment, **kwargs,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._stream("train", self._train_mode(), self.shuffle, True)
        self.val_set = self._stream("val", "eval", False, False)
        self.test_set = self._stream("test", "eval", False, False) if "test" in self.splits else self.val_set

    def _streaming_loader(self, split: str, batch_size: int) -> Any:
        from kd_lightning.data.imagefolder import collate_images

        # one loader per split for the whole fit: its state (epoch, samples yielded) is what
        # a checkpoint saves and a resume restores
        if split not in self._loaders:
            self._loaders[split] = _loader_class()(
                getattr(self, f"{split}_set"), batch_size=batch_size, num_workers=self.num_workers,
                pin_memory=self.pin_memory, collate_fn=collate_images,
                # fresh workers every epoch: each gets the stream's new epoch, hence its view
                persistent_workers=False,
            )
        return self._loaders[split]

    def train_dataloader(self) -> Any:
        return self._streaming_loader("train", self.batch_size)

    def val_dataloader(self) -> Any:
        return self._streaming_loader("val", self.eval_batch_size)

    def test_dataloader(self) -> Any:
        return self._streaming_loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> Any:
        return self.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        # the stream position is saved by Lightning from the StreamingDataLoader itself
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
