"""How a network reads a batch: one convention for images, text and future modalities.

A batch is a dict. A model names the batch keys it reads, in call order, in its
``input_keys`` attribute (default ``("image",)``); a text model reads
``("input_ids", "attention_mask")``. The module calls ``model(*[batch[k] for k in keys])``.

When teacher and student tokenize differently (a BiLSTM with its own vocabulary next to a
WordPiece BERT), the batch carries both encodings: ``student_<key>`` (or ``teacher_<key>``)
overrides ``<key>`` for that network, so each one reads its own.

What the data fixes about a network — image channels, or the vocabulary of the token ids a
model reads — reaches its builder as keyword arguments (``builder_inputs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError

Role = Literal["student", "teacher", "model"]
DEFAULT_KEYS: tuple[str, ...] = ("image",)
#: token inputs of a text batch, and what a dummy batch holds in each
TEXT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask")


def input_keys(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "input_keys", DEFAULT_KEYS))


def batch_key(batch: Mapping[str, Any], key: str, role: Role) -> str:
    """The batch key ``role``'s network reads for ``key``: ``<role>_<key>`` when present."""
    own = f"{role}_{key}"
    return own if own in batch else key


def model_inputs(model: nn.Module, batch: Mapping[str, Any], role: Role) -> tuple[Tensor, ...]:
    """The positional inputs of ``model`` from ``batch``."""
    try:
        return tuple(batch[batch_key(batch, k, role)] for k in input_keys(model))
    except KeyError as err:
        name = getattr(model, "kd_name", type(model).__name__)
        raise ConfigError(
            f"model.{role}", name,
            f"it reads batch key {err.args[0]!r} but the data yields {sorted(batch)}; pair a text "
            "model with a text DataModule and an image model with an image DataModule",
        ) from None


def batch_size(batch: Mapping[str, Any]) -> int:
    return len(batch["label"])


def is_text(input_shape: tuple[int, ...]) -> bool:
    """Token sequences have a (max_length,) shape; images (C, H, W)."""
    return len(input_shape) == 1


def check_input_shape(input_shape: Any) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (1, 3) or min(shape) <= 0:
        raise ConfigError(
            "model.input_shape", input_shape,
            "use (channels, height, width) for images, e.g. [3, 32, 32], or (max_length,) for text",
        )
    return shape


def builder_inputs(
    input_shape: tuple[int, ...], vocab_sizes: Mapping[str, int] | None, role: Role
) -> dict[str, Any]:
    """The builder keyword arguments that the data decides for ``role``'s network:
    ``in_channels`` for images; ``vocab_size`` and ``max_length`` for text."""
    if not is_text(input_shape):
        return {"in_channels": input_shape[0]}
    vocab = dict(vocab_sizes or {})
    key = f"{role}_input_ids" if f"{role}_input_ids" in vocab else "input_ids"
    if key not in vocab:
        raise ConfigError(
            "model.vocab_sizes", vocab_sizes,
            "a text model needs the vocabulary size of its input_ids; use a kd-lightning text "
            "DataModule (the CLI links it) or pass vocab_sizes: {input_ids: N}",
        )
    return {"vocab_size": int(vocab[key]), "max_length": input_shape[0]}


def dummy_batch(
    input_shape: tuple[int, ...], vocab_sizes: Mapping[str, int] | None = None, n: int = 2
) -> dict[str, Tensor]:
    """A batch of ``n`` zero inputs, for the construction-time probe of every network."""
    if not is_text(input_shape):
        return {"image": torch.zeros(n, *input_shape)}
    length = min(input_shape[0], 16)
    batch: dict[str, Tensor] = {}
    for ids_key in vocab_sizes or {"input_ids": 1}:
        prefix = ids_key[: -len("input_ids")]
        # token 1, not 0: 0 is usually [PAD], and an all-padding row has no valid position
        batch[ids_key] = torch.ones(n, length, dtype=torch.long)
        batch[f"{prefix}attention_mask"] = torch.ones(n, length, dtype=torch.long)
    return batch
