"""Causal language models: Hugging Face checkpoints and small built-in decoders.

``build_causal_lm(name, vocab_size, kwargs)``:

- ``hf:<folder or hub id>``: ``AutoModelForCausalLM.from_pretrained``; a local folder or
  the Hugging Face cache. Offline without a cache: set ``HF_HUB_OFFLINE=1`` and give a
  folder.
- ``llama``/``gpt2``: a randomly initialised decoder from transformers' own
  ``LlamaConfig``/``GPT2Config`` (``kwargs`` are that config's fields, e.g.
  ``{hidden_size: 64, num_hidden_layers: 2}``), for offline work and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kd_lightning.errors import ConfigError

#: built-in decoder name → (config class name, its defaults: a tiny model)
BUILTIN = {
    "llama": (
        "LlamaConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
    ),
    "gpt2": (
        "GPT2Config",
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
}


def build_causal_lm(
    name: str,
    vocab_size: int | None,
    kwargs: dict[str, Any] | None = None,
    field: str = "model.student",
) -> nn.Module:
    import transformers

    kwargs = dict(kwargs or {})
    if name.startswith("hf:"):
        source = name[3:]
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as err:
            raise ConfigError(
                field,
                name,
                f"cannot load it ({str(err).splitlines()[0]}); give a "
                "local model folder, or go online once to fill the HF cache",
            ) from None
        if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
            raise ConfigError(
                field,
                name,
                f"its embedding table is smaller than the data's "
                f"tokenizer ({vocab_size} tokens); use the model's own tokenizer",
            )
    elif name in BUILTIN:
        cls, defaults = BUILTIN[name]
        if vocab_size is None:
            raise ConfigError(field, name, "a built-in decoder needs the data's vocabulary size")
        try:
            if int(kwargs.get("vocab_size", vocab_size)) < vocab_size:
                raise ConfigError(
                    f"{field}_kwargs.vocab_size",
                    kwargs["vocab_size"],
                    f"use at least the tokenizer's {vocab_size} tokens",
                )
            # a larger vocab_size pads the table (as Qwen's); the module cuts it to the real one
            config = getattr(transformers, cls)(**{**defaults, "vocab_size": vocab_size, **kwargs})
            model = transformers.AutoModelForCausalLM.from_config(config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{field}_kwargs", kwargs, str(err).splitlines()[0]) from None
    else:
        raise ConfigError(field, name, f"use hf:<folder or hub id> or one of {sorted(BUILTIN)}")
    model.kd_name = name
    #: from_pretrained loaded trained weights; a built-in decoder is random (teacher check)
    model.kd_pretrained = name.startswith("hf:")
    return model


@dataclass
class LoRASpec:
    """A LoRA student (``model.lora``), through ``peft``: only the adapters train, go into
    the optimizer and into the checkpoint.

    Args:
        r: the adapters' rank.
        alpha: LoRA's scaling numerator (updates are scaled by ``alpha / r``).
        dropout: on the adapters' input.
        target_modules: names of the linear layers that get adapters (Llama: ``q_proj``,
            ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``;
            GPT-2: ``c_attn``, ``c_proj``, ``c_fc``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def apply_lora(model: nn.Module, spec: LoRASpec, field_name: str = "model.lora") -> nn.Module:
    """``model`` with LoRA adapters on ``spec.target_modules``; its own weights frozen."""
    try:
        import peft
    except ImportError:
        raise ConfigError(
            field_name, spec, 'LoRA needs peft: pip install "kd-lightning[llm]"'
        ) from None
    if spec.r < 1 or spec.alpha <= 0 or not 0 <= spec.dropout < 1:
        raise ConfigError(field_name, spec, "use r >= 1, alpha > 0 and 0 <= dropout < 1")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = sorted(set(spec.target_modules) - names)
    if missing or not spec.target_modules:
        raise ConfigError(
            f"{field_name}.target_modules",
            spec.target_modules,
            f"the model has no {missing or 'target'} module; its linear layers include "
            f"{sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))[:4]}",
        )
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    wrapped = peft.get_peft_model(model, config)
    wrapped.kd_name = getattr(model, "kd_name", None)
    return wrapped


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without its LM head (under a peft wrapper too)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def decoder_layers(model: nn.Module) -> int:
    """The number of decoder blocks (for layer maps and ``every_kth`` reports)."""
    config = model.config
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)
