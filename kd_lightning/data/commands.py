"""``kd-lightning data …``: dataset conversion and teacher-output storage.

::

    # an ImageFolder tree (or any image DataModule of a config) → LitData chunks
    kd-lightning data optimize --data_dir data/imagenet --output_dir data/imagenet_litdata
    kd-lightning data optimize -c configs/data/imagenet.yaml --output_dir s3://bucket/imagenet

    # the teacher's top-k outputs for every (training sample, view), ahead of training
    kd-lightning data store-teacher -c configs/repro/imagenet/resnet34_resnet18/kd.yaml \\
        --output runs/teacher_store/resnet34 --k 20 --views 4

``-c`` reads a kd-lightning YAML (the ``data:`` section, and for ``store-teacher`` the
``model.init_args.teacher``); flags override it. ``store-teacher`` shards the samples by
the ``RANK``/``WORLD_SIZE`` environment variables (``torchrun --nproc_per_node 8 -m
kd_lightning data store-teacher …``): each process writes its own rows of one store.
Bad input ends in one ``ConfigError`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from kd_lightning.errors import ConfigError, OneLineArgumentParser


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="kd-lightning data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="convert a dataset to LitData's streaming format")
    opt.add_argument("-c", "--config", help="a kd-lightning YAML with a data: section")
    opt.add_argument("--data_dir", help="an ImageFolder root (train/, val/); instead of -c")
    opt.add_argument("--val_dir", default="val", help="the val folder under --data_dir ('none': hold out)")
    opt.add_argument("--val_fraction", type=float, default=None,
                     help="with --val_dir none: share of train held out (default: the DataModule's)")
    opt.add_argument("--output_dir", required=True, help="local directory or object-store URL")
    opt.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    opt.add_argument("--chunk_bytes", default="64MB",
                     help="target chunk size; sets --chunk_size from the mean source size")
    opt.add_argument("--chunk_size", type=int, default=None,
                     help="items per chunk (default: from --chunk_bytes); the layout is the "
                          "same for every --num_workers")
    opt.add_argument("--start_method", choices=("fork", "spawn"), default="fork")
    opt.add_argument("--overwrite", action="store_true", help="replace an earlier dataset there")

    st = sub.add_parser("store-teacher", help="write the teacher's top-k outputs to a TeacherStore")
    st.add_argument("-c", "--config", required=True, action="append",
                    help="KD fit config(s) (data: and model.teacher); several merge in order, as in fit")
    st.add_argument("--output", required=True, help="the store's directory")
    st.add_argument("--k", type=int, default=20,
                    help="classes kept per sample (an LM config: tokens per completion token)")
    st.add_argument("--value_dtype", choices=("float16", "float32"), default="float16")
    st.add_argument("--views", type=int, help="override data.augment_views (K >= 1)")
    st.add_argument("--batch_size", type=int, default=256)
    st.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    st.add_argument("--stages", default="train,val",
                    help="comma-separated: train, val (an LM config: its splits, test too)")
    st.add_argument("--teacher_weights", help="override model.teacher.weights")
    st.add_argument("--overwrite", action="store_true", help="delete an earlier store there first")
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Entry of ``kd-lightning data``; a ``ConfigError`` propagates to the console script,
    which prints it as one line and exits 2 (bad flags too, through OneLineArgumentParser). Returns
    the written dataset's description (optimize) or the TeacherStore (store-teacher)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "store-teacher":
        args.overrides = _dotted_overrides(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "optimize":
        return optimize(args)
    previous = os.environ.get("PL_GLOBAL_SEED")
    try:
        return store_teacher(args)
    finally:  # store_teacher sets the run's seed for the views; leave the caller's as it was
        if previous is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = previous


def _dotted_overrides(extra: list[str]) -> list[tuple[str, Any]]:
    """``--data.batch_size=8`` / ``--seed_everything 0`` style overrides, as fit takes them."""
    out, i = [], 0
    while i < len(extra):
        key, eq, value = extra[i].partition("=")
        if not key.startswith("--") or key[2:].split(".")[0] not in ("data", "model", "seed_everything"):
            raise ConfigError(key, value or None, "store-teacher takes --data.*, --model.* and "
                              "--seed_everything overrides besides its own flags")
        if not eq:
            if i + 1 >= len(extra):
                raise ConfigError(key, None, "give a value: --key=value")
            value, i = extra[i + 1], i + 1
        out.append((key[2:], yaml.safe_load(value)))
        i += 1
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, key by key in mappings (LightningCLI's order for stacked -c);
    a new class_path drops the old init_args, as jsonargparse does."""
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            if "class_path" in value and value["class_path"] != old.get("class_path"):
                old = {}
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged


def compose(paths: list[str], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Configs merged in order, then dotted overrides (``data.x`` = ``data.init_args.x``)."""
    config: dict[str, Any] = {}
    for path in paths:
        config = _merge(config, load_config(path))
    for key, value in overrides:
        parts = key.split(".")
        if len(parts) > 1 and parts[1] not in ("class_path", "init_args"):
            parts.insert(1, "init_args")
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}", value, f"{part} is not a mapping in the config")
        node[parts[-1]] = value
    return config


# -- config helpers ------------------------------------------------------------------------------
def load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", path, "no such file")
    try:
        config = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", path, f"not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError("--config", path, "expected a mapping with data:/model: sections")
    return config


def instantiate(spec: Any, field: str, overrides: dict[str, Any] | None = None) -> Any:
    """A ``{class_path, init_args}`` mapping from a config → the object."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(field, spec, "give {class_path: …, init_args: {…}}")
    module, _, name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{field}.class_path", spec["class_path"], "no such class") from None
    kwargs = {**(spec.get("init_args") or {}), **(overrides or {})}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{field}.init_args", kwargs, str(err)) from None


def _datamodule(config: dict[str, Any], field: str = "data", **overrides: Any) -> Any:
    if "data" not in config:
        raise ConfigError("--config", None, "the config has no data: section")
    return instantiate(config["data"], field, overrides)


def _refuse_overwrite(path: Path, marker: str | None, flag: str, what: str, overwrite: bool) -> None:
    """Refuse to write into a folder holding earlier output (``marker``, or any file), unless
    ``--overwrite``; then the old output is deleted first, so nothing stale is mixed in."""
    if not path.exists():
        return
    held = (path / marker).exists() if marker else (not path.is_dir() or any(path.iterdir()))
    if not held:
        return
    if not overwrite:
        raise ConfigError(flag, str(path), f"holds an earlier {what}: pass --overwrite to replace it")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# -- optimize ------------------------------------------------------------------------------------
def optimize(args: argparse.Namespace) -> dict[str, Any]:
    from kd_lightning.data.imagefolder import ImageFolderDataModule
    from kd_lightning.data.streaming import is_remote, optimize_datamodule

    if (args.config is None) == (args.data_dir is None):
        raise ConfigError("--data_dir", args.data_dir, "give either -c <config with data:> or --data_dir")
    if args.num_workers < 1:
        raise ConfigError("--num_workers", args.num_workers, "use 1 or more worker processes")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ConfigError("--chunk_size", args.chunk_size, "use 1 or more items per chunk")
    if args.data_dir is not None:
        val_dir = None if args.val_dir.lower() == "none" else args.val_dir
        if args.val_fraction is not None and val_dir is not None:
            raise ConfigError("--val_fraction", args.val_fraction, "use it with --val_dir none")
        held = {} if args.val_fraction is None else {"val_fraction": args.val_fraction}
        dm = ImageFolderDataModule(args.data_dir, val_dir=val_dir, num_workers=0, **held)
        if val_dir is None:  # say what was held out: the DataModule's default is not obvious
            print(f"kd-lightning data optimize: holding out {dm.val_fraction:g} of train as val "
                  "(--val_fraction)")
    else:
        dm = _datamodule(load_config(args.config))
    if not is_remote(args.output_dir):
        _refuse_overwrite(Path(args.output_dir), None, "--output_dir", "dataset", args.overwrite)
    start = time.perf_counter()
    meta = optimize_datamodule(dm, args.output_dir, args.num_workers, args.chunk_bytes,
                               args.start_method, args.chunk_size)
    skipped = sum(meta["skipped"].values())
    print(
        f"kd-lightning data optimize: wrote {meta['splits']} samples ({meta['num_classes']} classes) to "
        f"{args.output_dir} in {time.perf_counter() - start:.1f} s; skipped {skipped} unreadable images"
    )
    if skipped and args.num_workers > 1:  # a skip shortens its chunk: see optimize_datamodule
        print("kd-lightning data optimize: with skipped images the chunk layout depends on "
              "--num_workers; remove the unreadable files for a layout every worker count repeats")
    return meta


# -- store-teacher -------------------------------------------------------------------------------
def store_teacher(args: argparse.Namespace) -> Any:
    from kd_lightning.modules.teacher import (
        TeacherSpec,
        build_teacher,
        fingerprint,
        refuse_untrained,
    )
    from kd_lightning.modules.teacher_store import TeacherStore

    config = compose(args.config, getattr(args, "overrides", []))
    # the views are seeded by the run's seed_everything (the CLI's default is 42), as in fit
    seed = config.get("seed_everything", 42)
    # `is`, not `in`: 0 == False and 1 == True, and seed 0 is every shipped config's seed
    if seed is None or seed is True:
        seed = 42
    if seed is False or not isinstance(seed, int):
        raise ConfigError("seed_everything", seed, "give an integer seed: the store's views follow it")
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    overrides = {"augment_views": args.views} if args.views is not None else {}
    dm = _datamodule(config, **overrides, num_workers=0)
    teacher_cfg = ((config.get("model") or {}).get("init_args") or {}).get("teacher")
    if hasattr(dm, "splits") and hasattr(dm, "tokenizer"):  # a PromptCompletionDataModule
        return _store_lm_teacher(args, dm, teacher_cfg)
    specs = teacher_cfg if isinstance(teacher_cfg, list) else [teacher_cfg]
    if not all(isinstance(s, dict) for s in specs):
        raise ConfigError("model.init_args.teacher", teacher_cfg, "the config names no teacher")
    if args.teacher_weights is not None:
        specs = [{**s, "weights": args.teacher_weights} for s in specs]
    device = torch.device(args.device)
    teachers = [
        build_teacher(TeacherSpec(**s), dm.num_classes, dm.input_shape[0], "model.teacher").to(device)
        for s in specs
    ]
    for teacher in teachers:
        refuse_untrained(teacher)
    _refuse_overwrite(Path(args.output), "meta.json", "--output", "teacher store", args.overwrite)
    store = TeacherStore(
        args.output, args.k, args.value_dtype,
        fields={"k": "--k", "path": "--output", "value_dtype": "--value_dtype"},
    )
    store.bind(dm, dm.num_classes, [fingerprint(t) for t in teachers])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for stage in stages:
        if stage not in store.tables:
            raise ConfigError("--stages", args.stages, f"use train and/or val (the store has {sorted(store.tables)})")
    from tqdm import tqdm

    start, written = time.perf_counter(), 0
    views = {s: store.tables[s].filled.shape[1] for s in stages}
    sets = {s: getattr(dm, f"{s}_set") for s in stages}
    total = sum(len(range(rank, len(sets[s]), world)) * views[s] for s in stages)
    # a bar over (sample, view) entries: a big store takes minutes (on stderr, like Lightning's)
    bar = tqdm(total=total, desc="store-teacher", unit="entry", disable=rank != 0)
    for stage in stages:
        ds = sets[stage]
        for view in range(views[stage]):
            bar.set_postfix(stage=stage, view=view)
            for batch in _view_batches(dm, ds, view, args.batch_size, rank, world):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                batch = dm.on_after_batch_transfer(batch, 0)
                with torch.inference_mode():
                    outputs = [_logits_only(t, batch["image"]) for t in teachers]
                store.write(stage, batch["index"], batch["view"], outputs)
                written += len(batch["index"])
                bar.update(len(batch["index"]))
    bar.close()
    store.flush()
    print(
        f"kd-lightning data store-teacher: rank {rank}/{world} wrote {written} (sample, view) entries "
        f"to {args.output} ({store.nbytes_per_entry()} bytes each) in {time.perf_counter() - start:.1f} s"
    )
    return store


def _store_lm_teacher(args: argparse.Namespace, dm: Any, teacher_cfg: Any) -> Any:
    """An LM config: the teacher's top-k next-token distributions per completion token
    (``modules/lm_token_store.py``), read by ``LMDistillationModule(token_store=...)``."""
    from kd_lightning.modules.lm_distillation import build_lm_teacher
    from kd_lightning.modules.lm_token_store import write_token_store
    from kd_lightning.modules.teacher import TeacherSpec, refuse_untrained

    if not isinstance(teacher_cfg, dict):
        raise ConfigError("model.init_args.teacher", teacher_cfg, "give the LM distiller's one teacher")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("WORLD_SIZE", os.environ["WORLD_SIZE"], "an LM token store is written "
                          "by one process: run store-teacher without torchrun")
    if args.views is not None:
        raise ConfigError("--views", args.views, "an LM token store has no augmentation views")
    if args.teacher_weights is not None:
        teacher_cfg = {**teacher_cfg, "weights": args.teacher_weights}
    teacher = build_lm_teacher(TeacherSpec(**teacher_cfg), len(dm.tokenizer), "model.teacher")
    refuse_untrained(teacher)
    _refuse_overwrite(Path(args.output), "meta.json", "--output", "token store", args.overwrite)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    start = time.perf_counter()
    store = write_token_store(args.output, teacher, dm, k=args.k, value_dtype=args.value_dtype,
                              stages=stages, batch_size=args.batch_size, device=args.device)
    tokens = sum(int(s["tokens"]) for s in store.meta["stages"].values())
    print(f"kd-lightning data store-teacher: wrote {tokens} completion tokens (top-{store.k} of "
          f"{store.vocab}) to {args.output} ({store.nbytes_per_token():.1f} bytes each) in "
          f"{time.perf_counter() - start:.1f} s")
    return store


def _logits_only(model: torch.nn.Module, images: torch.Tensor) -> Any:
    from kd_lightning.losses.outputs import ModelOutput

    return ModelOutput(model(images).float(), {})


def _view_batches(dm: Any, ds: Any, view: int, batch_size: int, rank: int, world: int) -> Any:
    """Batches of one view of every sample of ``ds`` that this rank writes."""
    from torch.utils.data import DataLoader

    from kd_lightning.data.imagefolder import collate_images

    positions = list(range(len(ds)))[rank::world]
    if hasattr(ds, "samples"):  # map-style file list: (position, view) keys, as the sampler asks
        keys = [(p, view) for p in positions]
        yield from DataLoader(_Keyed(ds, keys), batch_size=batch_size, collate_fn=collate_images)
        return
    ds.current_epoch = view + 1  # a LitData stream: its view is (epoch - 1) % K
    for start in range(0, len(positions), batch_size):
        yield collate_images([ds[p] for p in positions[start : start + batch_size]])


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, ds: Any, keys: list[Any]) -> None:
        self.ds, self.keys = ds, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:
        return self.ds[self.keys[i]]
