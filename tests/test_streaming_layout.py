"""Issue 21, finding 12: ``data optimize`` writes the same chunks whatever ``--num_workers``.

LitData's defaults (a shared work queue, chunks cut by bytes) gave 60 images in chunks of
[5, 5, 4, ..., 4, 2] with 1 worker and e.g. [5, 5, 4, ..., 2, 5, 5, 4, 2] with 2, different
from run to run, so a seeded stream shuffled differently at every step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kd_lightning.cli import main
from kd_lightning.data.streaming import StreamingImageDataModule, items_per_chunk
from kd_lightning.errors import ConfigError
from tests.helpers.jpeg_tree import write_jpeg_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_jpeg_tree(tmp_path_factory.mktemp("jpegs"), classes=3, per_class=20)


def _optimize(tree: Path, out: Path, workers: int, *extra: str) -> dict:
    main(["data", "optimize", "--data_dir", str(tree), "--output_dir", str(out),
          "--num_workers", str(workers), *extra])
    return json.loads((out / "train" / "index.json").read_text())


def _chunks(out: Path, index: dict) -> list[tuple[int, bytes]]:
    """Each chunk in index order: its item count and its bytes (names carry the worker rank)."""
    return [(c["chunk_size"], (out / "train" / c["filename"]).read_bytes()) for c in index["chunks"]]


def _epochs(out: Path, epochs: int = 2) -> list[list[int]]:
    dm = StreamingImageDataModule(str(out), batch_size=4, image_size=32, resize_size=36,
                                  num_workers=0, seed=3, augment_views=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [torch.cat([b["index"] for b in loader]).tolist() for _ in range(epochs)]


def test_optimize_layout_and_seeded_stream_do_not_depend_on_the_worker_count(tree, tmp_path):
    one = _optimize(tree, tmp_path / "w1", 1, "--chunk_size", "7")
    two = _optimize(tree, tmp_path / "w2", 2, "--chunk_size", "7")
    assert [c["chunk_size"] for c in one["chunks"]] == [7] * 8 + [4]
    assert len({c["filename"].split("-")[1] for c in two["chunks"]}) == 2  # two workers wrote
    assert _chunks(tmp_path / "w1", one) == _chunks(tmp_path / "w2", two)  # byte-equal, in order
    assert one["config"] == two["config"]
    # a seeded shuffled stream reads the same samples in the same order, epoch after epoch
    first = _epochs(tmp_path / "w1")
    assert first == _epochs(tmp_path / "w2")
    assert first[0] != first[1] and len(first[0]) == 60  # reshuffled per epoch


def test_chunk_size_follows_chunk_bytes_from_the_inputs_alone(tree, tmp_path):
    # the default layout: --chunk_bytes over the mean file size, the same for every worker count
    files = sorted(str(p) for p in (tree / "train").rglob("*.JPEG"))
    inputs = [(i, 0, f) for i, f in enumerate(files)]
    mean = sum(Path(f).stat().st_size for f in files) / len(files)
    assert items_per_chunk(inputs, math.ceil(5 * mean)) == 5
    one = _optimize(tree, tmp_path / "b1", 1, "--chunk_bytes", str(math.ceil(5 * mean)))
    two = _optimize(tree, tmp_path / "b2", 2, "--chunk_bytes", str(math.ceil(5 * mean)))
    assert [c["chunk_size"] for c in one["chunks"]] == [5] * 12
    assert _chunks(tmp_path / "b1", one) == _chunks(tmp_path / "b2", two)


@pytest.mark.parametrize(("flag", "value"), [("--chunk_bytes", "lots"), ("--chunk_size", "0")])
def test_bad_chunk_flags_are_one_line(tree, tmp_path, flag, value):
    with pytest.raises(ConfigError, match=f"{flag}=") as info:
        _optimize(tree, tmp_path / "bad", 1, flag, value)
    assert "\n" not in str(info.value)
