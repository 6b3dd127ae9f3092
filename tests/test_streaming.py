"""LitData streaming: ``kd-lightning data optimize`` on a tiny JPEG tree, KD on the stream,
disjoint DDP shards, resume of the stream position, and ``data store-teacher``."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.cli import main
from kd_lightning.data.streaming import StreamingImageDataModule
from kd_lightning.errors import ConfigError
from tests.conftest import DEBUG_TRAINER, logger_args
from tests.helpers.jpeg_tree import write_jpeg_tree

SMALL = dict(image_size=32, resize_size=36, num_workers=0)


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    """The tiny tree (3 classes × 4 images, plus one corrupt file) converted to LitData."""
    root = write_jpeg_tree(tmp_path_factory.mktemp("jpegs"), classes=3, per_class=4)
    (root / "train" / "class_2" / "broken.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path_factory.mktemp("litdata")
    main(["data", "optimize", "--data_dir", str(root), "--output_dir", str(out), "--num_workers", "1"])
    return out


def test_optimize_writes_litdata_chunks_and_counts_skipped(stream):
    meta = json.loads((stream / "kd_lightning.json").read_text())
    assert meta["num_classes"] == 3 and meta["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["splits"] == {"train": 12, "val": 12} and meta["skipped"] == {"train": 1, "val": 0}
    assert (stream / "train" / "index.json").is_file() and list((stream / "train").glob("chunk-*.bin"))
    dm = StreamingImageDataModule(str(stream), batch_size=4, **SMALL)
    dm.setup("fit")
    indices = sorted(int(dm.train_set[i]["index"]) for i in range(len(dm.train_set)))
    assert indices == [i for i in range(13) if i != 8]  # the ImageFolder's indices; 8 = broken.JPEG


def test_kd_fit_on_the_stream_and_resume_position(stream, tmp_path):
    cli = main([
        "fit", "--model=kd_lightning.modules.DistillationModule", "--model.student=resnet8",
        "--model.teacher.model=resnet8", "--model.teacher.allow_untrained=true",
        "--data=kd_lightning.data.StreamingImageDataModule",
        f"--data.init_args.input_dir={stream}", "--data.init_args.batch_size=4",
        "--data.init_args.image_size=32", "--data.init_args.resize_size=36",
        "--data.init_args.num_workers=0", "--data.init_args.augment_views=1",
        *DEBUG_TRAINER, "--test_after_fit=false", *logger_args(tmp_path / "logs"),
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}", "--checkpoint.filename=last",
    ])
    assert cli.trainer.global_step == 2
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    # Lightning saved the StreamingDataLoader's position: a resume continues the stream
    states = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert states and states[0]["num_samples_yielded"] == 8


def test_resumed_loader_continues_where_it_stopped(stream):
    def loader():
        dm = StreamingImageDataModule(str(stream), batch_size=2, seed=3, **SMALL)
        dm.setup("fit")
        return dm.train_dataloader()

    full = [b["index"].tolist() for b in loader()]
    first = loader()
    seen = []
    for i, batch in enumerate(first):
        seen.append(batch["index"].tolist())
        if i == 1:
            state = first.state_dict()
            break
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["index"].tolist() for b in resumed]
    assert seen + rest == full and len(full) == 6


def _rank(rank: int, stream: str, port: int, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    dm = StreamingImageDataModule(stream, batch_size=2, **SMALL)
    dm.setup("fit")
    seen = [int(i) for batch in dm.train_dataloader() for i in batch["index"]]
    torch.save(seen, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="forks the two ranks")
def test_two_ddp_ranks_read_disjoint_samples(stream, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # fork: the ranks start without re-importing torch
    procs = [ctx.Process(target=_rank, args=(r, str(stream), port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0] and ranks[1]
    assert not set(ranks[0]) & set(ranks[1])  # each rank its own share of the stream
    assert len(ranks[0]) == len(ranks[1])  # same number of steps on every rank
    assert set(ranks[0]) | set(ranks[1]) <= {i for i in range(13) if i != 8}


def test_store_teacher_command_and_bad_input(stream, tmp_path):
    cfg = tmp_path / "kd.yaml"
    cfg.write_text(
        "model:\n  init_args:\n    teacher: {model: resnet8, allow_untrained: true}\n"
        "data:\n  class_path: kd_lightning.data.StreamingImageDataModule\n"
        f"  init_args: {{input_dir: {stream}, image_size: 32, resize_size: 36, augment_views: 2}}\n"
    )
    store = main(["data", "store-teacher", "-c", str(cfg), "--output", str(tmp_path / "store"),
                  "--k", "2", "--device", "cpu", "--batch_size", "5"])
    assert store.tables["train"].filled.shape == (13, 2)
    assert int(store.tables["train"].filled.sum()) == 2 * 12 and int(store.tables["val"].filled.sum()) == 12
    # issue 21, finding 4: a random teacher is refused unless the config allows it
    cfg.write_text(cfg.read_text().replace(", allow_untrained: true", ""))
    with pytest.raises(ConfigError, match=r"model\.teacher\.model='resnet8'.*allow_untrained: true"):
        main(["data", "store-teacher", "-c", str(cfg), "--output", str(tmp_path / "random"),
              "--k", "2", "--device", "cpu"])
    with pytest.raises(ConfigError, match="no LitData train split"):
        StreamingImageDataModule(str(tmp_path))
    with pytest.raises(ConfigError, match="either -c"):
        main(["data", "optimize", "--output_dir", str(tmp_path / "o")])



class Crash(Exception):
    pass


class CrashAtStep(L.Callback):
    """Die (uncleanly: no checkpoint on the way out) when ``global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash(self.step)


# 2 workers: ~12 s on a shared 2-core CPU (worker start-up every epoch)
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resumed_fit_runs_every_remaining_epoch(stream, tmp_path, workers):
    """Issue 21 finding 1: a fit resumed mid-epoch from a streaming checkpoint trained its
    resumed epoch and then stopped: LitData's loader kept its ``restore`` flag because
    Lightning ends the epoch without exhausting the iterator, so every later epoch was empty
    and the fit exited 0 short of ``max_epochs``."""
    args = [
        "fit", "--model=kd_lightning.modules.DistillationModule", "--model.student=resnet8",
        "--model.teacher.model=resnet8", "--model.teacher.allow_untrained=true",
        "--data=kd_lightning.data.StreamingImageDataModule",
        f"--data.init_args.input_dir={stream}", "--data.init_args.batch_size=4",
        "--data.init_args.image_size=32", "--data.init_args.resize_size=36",
        f"--data.init_args.num_workers={workers}", *DEBUG_TRAINER[:2],
        "--trainer.limit_val_batches=1", "--trainer.max_epochs=3", "--test_after_fit=false",
        "--checkpoint.every_n_train_steps=2", *logger_args(tmp_path / "logs"),
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ]
    # 12 samples / batch 4 = 3 steps per epoch; last.ckpt at step 4 (1 batch into epoch 1)
    with pytest.raises(Crash):
        main([*args, "--trainer.callbacks+=tests.test_streaming.CrashAtStep",
              "--trainer.callbacks.step=5"])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 4)
    resumed = main([*args, "--ckpt_path=last"])
    assert resumed.trainer.global_step == 9 and resumed.trainer.current_epoch == 3
