"""The tiny Llama the LM tests build (transformers' LlamaConfig keyword arguments)."""

from __future__ import annotations


def tiny_llama(num_hidden_layers: int = 2) -> dict[str, int]:
    """Hidden 32, 2 heads: seconds per fit on one CPU thread."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
