"""``kd-lightning import-teacher``: a published RepDistiller/mdistiller teacher as a kd-lightning
teacher checkpoint.

RepDistiller (``train_teacher.py``) saves ``{"epoch", "model": state_dict, "accuracy",
"optimizer"}``; its published teachers (``scripts/fetch_pretrained_teachers.sh``) and
mdistiller's (``download_ckpts/cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth``, the same
files) have that layout, and mdistiller's own ``save_checkpoint`` writes a ``"model"`` entry
whose keys may carry ``module.`` (DataParallel) and ``student.``/``teacher.`` (its
``Distiller``) prefixes. kd-lightning's CIFAR models register their modules in the
reference's order and with the reference's shapes, only some names differ
(``conv1/bn1`` → ``stem.0/stem.1``, ``linear``/``classifier`` → ``fc``, ``block1.layer`` →
``layer1`` …). So tensors are paired in order, and every pair must agree on its kind
(``weight``, ``bias``, ``running_mean`` …) and on its shape; the first disagreement is
reported with both names and shapes. The result is a ClassifierModule checkpoint
(``hyper_parameters`` + ``state_dict`` prefixed ``model.``) that ``teacher.checkpoint`` and
``kd-lightning test`` read like one trained here::

    kd-lightning import-teacher --format repdistiller resnet32x4_vanilla/ckpt_epoch_240.pth \\
        --model resnet32x4 -o runs/teachers/resnet32x4.ckpt
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.errors import ConfigError, OneLineArgumentParser

FORMATS = ("repdistiller", "mdistiller")


def reference_state(obj: Any, fmt: str) -> OrderedDict[str, Tensor]:
    """The network's tensors from a loaded reference file, in their saved order."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"use one of {', '.join(FORMATS)}")
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(
            "file", type(obj).__name__,
            f"not a {fmt} checkpoint: expected a state dict of tensors or a dict with a 'model' "
            "entry holding one",
        )
    out = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
    if fmt == "mdistiller" and any(k.startswith("student.") for k in out):
        # a Distiller's checkpoint: the trained network is its student
        out = OrderedDict((k.removeprefix("student."), v) for k, v in out.items()
                          if k.startswith("student."))
    return out


def map_state(theirs: OrderedDict[str, Tensor], ours: dict[str, Tensor], model: str) -> dict[str, Tensor]:
    """Pair their tensors with the model's, in order; kinds and shapes must agree."""
    t_keys, o_keys = list(theirs), list(ours)
    for i, (t, o) in enumerate(zip(t_keys, o_keys)):
        t_kind, o_kind = t.rsplit(".", 1)[-1], o.rsplit(".", 1)[-1]
        t_shape, o_shape = tuple(theirs[t].shape), tuple(ours[o].shape)
        if t_kind != o_kind or t_shape != o_shape:
            raise ConfigError(
                "--model", model,
                f"tensor {i} does not fit: the file's {t!r} {t_shape} vs {model}'s {o!r} "
                f"{o_shape}; the file holds another architecture (or class count): pick the "
                "--model it was trained as",
            )
    if len(t_keys) != len(o_keys):
        extra = t_keys[len(o_keys)] if len(t_keys) > len(o_keys) else o_keys[len(t_keys)]
        raise ConfigError(
            "--model", model,
            f"the file holds {len(t_keys)} tensors, {model} has {len(o_keys)} (first unmatched: "
            f"{extra!r}); pick the --model the file was trained as",
        )
    return {o: theirs[t].detach().clone() for t, o in zip(t_keys, o_keys)}


def import_teacher(path: str | Path, fmt: str, model: str, input_shape: tuple[int, ...] = (3, 32, 32),
                   num_classes: int | None = None) -> dict[str, Any]:
    """Load ``path`` (a ``fmt`` checkpoint) into registry model ``model``; return the
    ClassifierModule checkpoint dict (see the module docstring)."""
    from kd_lightning.modules import ClassifierModule

    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"use one of {', '.join(FORMATS)}")
    obj = read_checkpoint(path, "file", "give the path of the .pth to import")
    theirs = reference_state(obj, fmt)
    if num_classes is None:  # the classifier's bias is the last 1-d tensor before the end
        biases = [v for k, v in theirs.items() if k.endswith("bias") and v.ndim == 1]
        num_classes = int(biases[-1].shape[0]) if biases else 100
    module = ClassifierModule(model=model, num_classes=num_classes, input_shape=input_shape)
    state = map_state(theirs, module.model.state_dict(), model)
    module.model.load_state_dict(state, strict=True)
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    return {
        "state_dict": module.state_dict(),
        # as LightningCLI saves them, so `kd-lightning test --ckpt_path` rebuilds the module
        "hyper_parameters": {"_class_path": "kd_lightning.modules.ClassifierModule",
                             **dict(module.hparams),
                             "_instantiator": "lightning.pytorch.cli.instantiate_module"},
        "epoch": int(epoch) - 1 if isinstance(epoch, int) and epoch > 0 else 0,  # 0-based here
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "kd_imported_from": {"file": str(Path(path)), "format": fmt,
                             "reported_accuracy": _accuracy(obj)},
    }


def _accuracy(obj: Any) -> float | None:
    if not isinstance(obj, dict):
        return None
    for key in ("accuracy", "best_acc"):
        value = obj.get(key)
        if value is not None:
            return float(value)
    return None


def main(argv: list[str]) -> Path:
    parser = OneLineArgumentParser(
        prog="kd-lightning import-teacher",
        description="Turn a RepDistiller/mdistiller teacher .pth into a kd-lightning teacher "
        "checkpoint (for teacher.checkpoint in KD configs).",
    )
    parser.add_argument("file", help="the .pth file to import")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--model", required=True, help="registry name, e.g. resnet32x4")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="default: read from the classifier's bias")
    parser.add_argument("--input_shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("-o", "--output", default=None, help="default: <file stem>.ckpt beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    target = Path(args.output) if args.output else Path(args.file).with_suffix(".ckpt")
    if target.exists() and not args.overwrite:  # before the import: it may be a trained teacher
        raise ConfigError("--output", str(target), "exists: pass --overwrite to replace it")
    ckpt = import_teacher(args.file, args.format, args.model, tuple(args.input_shape), args.num_classes)
    out = target
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    n = sum(v.numel() for v in ckpt["state_dict"].values())
    print(f"kd-lightning: wrote {out} ({args.model}, {n:,} values from {args.format} file "
          f"{args.file}); use it as model.init_args.teacher.checkpoint")
    return out
