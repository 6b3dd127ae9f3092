"""Write tiny datasets in the *real* on-disk formats, so loaders run their real code.

MNIST: the IDX files torchvision reads (``{root}/MNIST/raw/*-ubyte``).
CIFAR: the "python version" pickle batches (``{root}/cifar-10-batches-py/data_batch_1`` …).
Pixels are class-dependent patterns plus noise, so a model can actually learn them.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _patterned_images(n: int, h: int, w: int, c: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, h, w, c), dtype=np.int64)
    for k in range(num_classes):  # a bright band whose position encodes the class
        row = (k * h) // num_classes
        images[labels == k, row : row + max(1, h // num_classes), :, :] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, h, w) + images.tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 300, n_test: int = 100, folder: str = "MNIST") -> Path:
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = _patterned_images(n, 28, 28, 1, 10, seed)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images[..., 0])
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


def write_cifar10(root: Path, per_batch: int = 60, n_test: int = 100) -> Path:
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        images, labels = _patterned_images(per_batch, 32, 32, 3, 10, seed=i)
        _dump(folder / f"data_batch_{i}", images, labels, "labels", f"training batch {i} of 5")
    images, labels = _patterned_images(n_test, 32, 32, 3, 10, seed=99)
    _dump(folder / "test_batch", images, labels, "labels", "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, fh)
    return Path(root)


def write_cifar100(root: Path, n_train: int = 400, n_test: int = 200) -> Path:
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = _patterned_images(n, 32, 32, 3, 100, seed)
        _dump(folder / name, images, labels, "fine_labels", name, coarse=True)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, fh)
    return Path(root)


def _dump(path: Path, images: np.ndarray, labels: np.ndarray, key: str, batch_label: str,
          coarse: bool = False) -> None:
    # The official files store rows as R-plane, G-plane, B-plane (N, 3072).
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    entry = {"batch_label": batch_label, key: labels.tolist(), "data": data,
             "filenames": [f"img_{i}.png" for i in range(len(images))]}
    if coarse:
        entry["coarse_labels"] = (labels // 5).tolist()
    with open(path, "wb") as fh:
        pickle.dump(entry, fh, protocol=2)
