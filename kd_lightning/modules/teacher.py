"""Frozen teachers: where they come from, how they are frozen, how they are identified.

A teacher is rebuilt from its *source* (a ClassifierModule checkpoint, or a model name plus
an optional weights file) every time a DistillationModule is constructed — on a fresh fit,
on resume and in ``load_from_checkpoint`` — so it never needs to live in KD checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.errors import ConfigError
from kd_lightning.models import model_from_config


@dataclass
class TeacherSpec:
    """Where a teacher comes from.

    Args:
        checkpoint: a ClassifierModule ``.ckpt``; its architecture is read from the file.
        model: a registered model name, used when there is no checkpoint (or to assert
            the checkpoint's architecture).
        model_kwargs: extra builder arguments for ``model``.
        weights: optional ``state_dict`` file (``torch.save(model.state_dict())``) for ``model``.
        weight: the teacher's weight in a multi-teacher ensemble.
        allow_untrained: distil from a teacher with no trained weights (no checkpoint, no
            ``weights`` file, no pretrained weights): a fit or store refuses one otherwise.
    """

    checkpoint: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weight: float = 1.0
    allow_untrained: bool = False

    def __post_init__(self) -> None:
        # jsonargparse 4.x turns `--model.teacher.checkpoint=null` inside a model's init_args
        # into the string 'None', which then reads as a missing file named None
        for name in ("checkpoint", "model", "weights"):
            if getattr(self, name) in ("None", "null"):
                setattr(self, name, None)


def _load_file(path: str, field_name: str) -> Any:
    return read_checkpoint(
        path, field_name,
        "train the teacher first (kd-lightning fit with a ClassifierModule config) or fix the path",
    )


def build_teacher(
    spec: TeacherSpec, num_classes: int, inputs: int | dict[str, Any], field_name: str
) -> nn.Module:
    """Build and freeze one teacher from its spec. ``inputs``: what the data fixes about the
    network (``in_channels`` as an int, or ``modules.inputs.builder_inputs``)."""
    inputs = {"in_channels": inputs} if isinstance(inputs, int) else dict(inputs)
    if spec.checkpoint:
        ckpt = _load_file(spec.checkpoint, f"{field_name}.checkpoint")
        hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in hparams:
            raise ConfigError(
                f"{field_name}.checkpoint", spec.checkpoint,
                "this is not a ClassifierModule checkpoint; for a bare state_dict use "
                f"{field_name}.model + {field_name}.weights",
            )
        arch = hparams["model"]
        if spec.model and spec.model != arch:
            raise ConfigError(
                f"{field_name}.model", spec.model,
                f"the checkpoint holds a {arch!r}; set {field_name}.model: {arch} or drop it",
            )
        teacher_classes = int(hparams.get("num_classes", num_classes))
        if teacher_classes != num_classes:
            raise ConfigError(
                f"{field_name}.checkpoint", spec.checkpoint,
                f"the teacher was trained for {teacher_classes} classes but the data has "
                f"{num_classes}; use a teacher trained on this dataset",
            )
        _check_trained_inputs(hparams, inputs, f"{field_name}.checkpoint", spec.checkpoint)
        kwargs = dict(hparams.get("model_kwargs") or {})
        model = model_from_config(arch, num_classes, inputs, f"{field_name}.model", kwargs)
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        _load_state(model, state, f"{field_name}.checkpoint", spec.checkpoint)
        # the vocabularies a text teacher was trained on (saved by text DataModules), checked
        # against the data's once it is set up: a retrained WordPiece can keep its size
        model.kd_tokenizers = next(
            (v["tokenizers"] for v in ckpt.values() if isinstance(v, dict) and "tokenizers" in v), None
        )
    elif spec.model:
        model = model_from_config(spec.model, num_classes, inputs, f"{field_name}.model", spec.model_kwargs)
        if spec.weights:
            state = _load_file(spec.weights, f"{field_name}.weights")
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            _load_state(model, state, f"{field_name}.weights", spec.weights)
    else:
        raise ConfigError(
            field_name, spec, "give a teacher `checkpoint`, or a `model` name (plus optional `weights`)"
        )
    mark_untrained(model, spec, field_name)
    return freeze(model)


def mark_untrained(model: nn.Module, spec: TeacherSpec, field_name: str) -> None:
    """Mark a teacher built from ``spec`` with random weights, unless ``allow_untrained``
    (``refuse_untrained`` refuses it at fit, store or compress); image and LM teachers alike."""
    trained = bool(spec.checkpoint or spec.weights or getattr(model, "kd_pretrained", False))
    #: (field, model name) of a teacher with random weights that was not allowed to be one
    model.kd_untrained = None if trained or spec.allow_untrained else (field_name, spec.model)


def refuse_untrained(teacher: nn.Module) -> None:
    """A fit or store must not distil from a random network without saying so (issue 21,
    finding 4): ``tv:``/``timm:`` and built-in models start untrained."""
    untrained = getattr(teacher, "kd_untrained", None)
    if untrained:
        field_name, name = untrained
        raise ConfigError(
            f"{field_name}.model", name,
            f"this teacher has no trained weights (no {field_name}.checkpoint, "
            f"{field_name}.weights or pretrained weights such as model_kwargs.weights for tv:); "
            f"give them, or set {field_name}.allow_untrained: true to distil from a random network",
        )


def _check_trained_inputs(hparams: dict, inputs: dict[str, Any], field_name: str, path: str) -> None:
    """The data must feed the teacher what it was trained on: as many image channels, or
    token ids from a vocabulary of the same size."""
    shape = hparams.get("input_shape")
    if "in_channels" in inputs:
        if shape is not None and (len(shape) != 3 or int(shape[0]) != inputs["in_channels"]):
            raise ConfigError(
                field_name, path,
                f"the teacher was trained on {_describe(shape)} {tuple(shape)} but the data has "
                f"{inputs['in_channels']} channel(s) (e.g. a CIFAR teacher on MNIST); use a "
                "teacher trained on this dataset",
            )
        return
    if shape is not None and len(shape) != 1:
        raise ConfigError(field_name, path, f"the teacher was trained on images {tuple(shape)}, not text")
    trained = (hparams.get("vocab_sizes") or {}).get("input_ids")
    if trained is not None and int(trained) != inputs["vocab_size"]:
        raise ConfigError(
            field_name, path,
            f"the teacher reads a vocabulary of {trained} tokens but the data's tokenizer has "
            f"{inputs['vocab_size']}; give the data the tokenizer the teacher was trained with "
            "(same data.tokenizer and data.vocab_size)",
        )


def check_teacher_vocabulary(teacher: nn.Module, datamodule: Any, field_name: str) -> None:
    """Refuse data whose tokenizer differs from the one the teacher checkpoint was trained on."""
    saved = (getattr(teacher, "kd_tokenizers", None) or {}).get("input_ids")
    now = getattr(datamodule, "tokenizer_digests", None) or {}
    current = now.get("teacher_input_ids", now.get("input_ids"))
    if saved and current and saved != current:
        raise ConfigError(
            "data.tokenizer", getattr(datamodule, "tokenizer", None),
            f"the teacher ({field_name}) was trained on another vocabulary (digest {saved}, the "
            f"data's {current}); use the teacher run's data_dir or point data.tokenizer at its "
            "tokenizer JSON (data_dir/tokenizers/)",
        )


def _describe(shape: Any) -> str:
    return f"{int(shape[0])}-channel inputs" if len(shape) == 3 else "token sequences"


def _load_state(model: nn.Module, state: dict, field_name: str, path: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3]
        raise ConfigError(
            field_name, path,
            f"its weights do not fit {getattr(model, 'kd_name', type(model).__name__)!r} "
            f"(different architecture?): {' '.join(s.strip() for s in first)}",
        ) from None


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients, permanently: ``train()`` on a frozen teacher is a no-op."""
    model.eval()
    model.requires_grad_(False)
    # BN/dropout must never switch to train mode; a partial (not a bound method) pickles,
    # so modules holding teachers survive ddp_spawn and deepcopy
    model.train = functools.partial(_stay_in_eval, model)
    return model


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def fingerprint(model: nn.Module) -> str:
    """A SHA-256 over every parameter and buffer: identifies the exact teacher weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
