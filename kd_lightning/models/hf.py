"""``hf:<hub id or local path>``: any Hugging Face ``AutoModelForSequenceClassification``.

The wrapped network reads ``(input_ids, attention_mask)`` and returns logits, like every
text model here. Its feature layers are real (parameter-free) submodules that the forward
pass feeds, so ordinary forward hooks — the ones feature heads use — see them:

``embeddings``
    the embedding output, ``(B, L, H)`` (the input of encoder layer 0).
``hidden.{i}``
    the output of encoder layer ``i`` (0-based, as ``encoder.layer.{i}``), ``(B, L, H)``.
``attention.{i}``
    the attention probabilities of layer ``i``, ``(B, heads, L, L)``. Only computed while a
    hook is registered on one of them, and then with the eager attention implementation
    (fused kernels such as SDPA never materialise the matrix).
``attention_scores.{i}``
    the pre-softmax attention scores of layer ``i``, ``(B, heads, L, L)``: ``Q·Kᵀ/√d`` plus
    TinyBERT's additive mask ``(1 - mask)·(-10000)`` on padded keys (its
    ``transformer/modeling.py`` L401-L406 and L830), recomputed from the outputs of each
    layer's ``query``/``key`` projections (BERT-style ``attention.self``; other
    architectures raise a ConfigError). Only computed while a hook is registered on one.
``pooler``
    the pooled sentence vector, ``(B, H)``: the model's own pooler output where it has one
    (BERT: tanh(W·h_[CLS])), otherwise the last layer's first-token state.

Loading (``pretrained: true``): the local cache is tried first (``local_files_only``), so
a cached or on-disk model never touches the network; only when it is missing and
``HF_HUB_OFFLINE`` is not set does a download start, after a short reachability check,
so an offline machine gets one clear line instead of a hang. ``pretrained: false`` builds
the architecture from its config alone (the config must be cached or local) with the
data's vocabulary size, as an untrained network.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.models.registry import Builder, register_prefix

#: how long the reachability check of the Hugging Face Hub may take before we give up
HUB_TIMEOUT_S = 5.0


class HFTextClassifier(nn.Module):
    """A sequence classifier from ``transformers`` with named feature taps.

    Args:
        model: a ``PreTrainedModel`` for sequence classification (``model.config`` holds
            ``num_hidden_layers``); kept as the ``model`` submodule, so its parameters keep
            their Hugging Face names under ``model.`` (``model.bert.encoder.layer.3``).
    """

    input_keys: tuple[str, ...] = ("input_ids", "attention_mask")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        depth = int(model.config.num_hidden_layers)
        self.embeddings = nn.Identity()
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.attention = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.attention_scores = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.pooler = nn.Identity()
        self.feature_layers: tuple[str, ...] = (
            "embeddings",
            *(f"hidden.{i}" for i in range(depth)),
            *(f"attention.{i}" for i in range(depth)),
            *(f"attention_scores.{i}" for i in range(depth)),
            "pooler",
        )
        #: per layer: its self-attention module, whose query/key outputs give the scores
        self._self_attn = _bert_self_attention(model, depth)
        self._qk: dict[tuple[str, int], Tensor] | None = None
        for i, attn in enumerate(self._self_attn or ()):
            attn.query.register_forward_hook(self._keep_qk("q", i))
            attn.key.register_forward_hook(self._keep_qk("k", i))
        self._pooled: Tensor | None = None
        base = getattr(model, "base_model", model)
        own_pooler = getattr(base, "pooler", None)
        if isinstance(own_pooler, nn.Module):
            own_pooler.register_forward_hook(self._keep_pooled)

    @property
    def depth(self) -> int:
        return len(self.hidden)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def _keep_pooled(self, _module: nn.Module, _inputs: Any, output: Tensor) -> None:
        self._pooled = output

    def _attention_hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.attention)

    def _keep_qk(self, kind: str, index: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if self._qk is not None:
                self._qk[(kind, index)] = output

        return hook

    def _feed_scores(self, attention_mask: Tensor) -> None:
        """TinyBERT's attention scores from the captured query/key projections."""
        qk, self._qk = self._qk or {}, None
        pad = (1.0 - attention_mask[:, None, None, :].to(qk[("q", 0)].dtype)) * -10000.0
        for i, (tap, attn) in enumerate(zip(self.attention_scores, self._self_attn or ())):
            b, length, _ = qk[("q", i)].shape
            heads, size = attn.num_attention_heads, attn.attention_head_size
            q = qk[("q", i)].view(b, length, heads, size).transpose(1, 2)
            k = qk[("k", i)].view(b, length, heads, size).transpose(1, 2)
            tap(q @ k.transpose(-1, -2) / math.sqrt(size) + pad)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        want_attn = self._attention_hooked()
        if want_attn and self.model.config._attn_implementation != "eager":
            # SDPA/flash kernels never form the probability matrix that the taps need
            self.model.set_attn_implementation("eager")
        self._pooled = None
        want_scores = any(m._forward_hooks or m._forward_pre_hooks for m in self.attention_scores)
        if want_scores:
            if self._self_attn is None:
                raise ConfigError(
                    "attention_scores", type(self.model).__name__,
                    "score taps need BERT-style attention (attention.self.query/key); "
                    "use the attention.{i} probabilities (AttentionMSE attention: probabilities)",
                )
            self._qk = {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            output_attentions=want_attn,
            return_dict=True,
        )
        states = out.hidden_states  # (embeddings, layer 0, …, layer depth-1)
        self.embeddings(states[0])
        for tap, h in zip(self.hidden, states[1:]):
            tap(h)
        if want_attn:
            for tap, a in zip(self.attention, out.attentions):
                tap(a)
        if want_scores:
            self._feed_scores(attention_mask)
        self.pooler(self._pooled if self._pooled is not None else states[-1][:, 0])
        self._pooled = None
        return out.logits


def _bert_self_attention(model: nn.Module, depth: int) -> list[nn.Module] | None:
    """Each encoder layer's ``attention.self`` (query, key, head counts), or None."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or len(layers) != depth:
        return None
    found = [getattr(getattr(layer, "attention", None), "self", None) for layer in layers]
    needs = ("query", "key", "num_attention_heads", "attention_head_size")
    if all(m is not None and all(hasattr(m, n) for n in needs) for m in found):
        return found
    return None


def check_vocab(model: HFTextClassifier, vocab_size: int | None, name: str) -> None:
    """The data's token ids must index the model's embedding table."""
    if vocab_size is not None and int(vocab_size) > model.vocab_size:
        raise ConfigError(
            "model", name,
            f"its embedding table holds {model.vocab_size} tokens but the data's tokenizer has "
            f"{vocab_size} (data.tokenizer / data.vocab_size): use the model's own tokenizer "
            f"(data.tokenizer: <its hub id or path>) or data.vocab_size <= {model.vocab_size}",
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name)``: the cache first, the Hub only when allowed."""
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_err:
        first_line = str(cached_err).strip().splitlines()[0]
        if Path(name).expanduser().exists():  # a local folder: no download can help
            raise ConfigError(
                "model", f"hf:{name}",
                f"the folder has no loadable model ({first_line}); save one there with "
                "save_pretrained()",
            ) from None
        if isinstance(cached_err, ValueError):  # cached, but not a model transformers knows
            raise ConfigError(
                "model", f"hf:{name}",
                f"transformers cannot build it ({first_line}); use a sequence-classification model",
            ) from None
        if _offline() or not _hub_reachable():
            why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face Hub is unreachable"
            raise ConfigError(
                "model", f"hf:{name}",
                f"it is not in the local Hugging Face cache and {why}: download it once on a "
                "machine with network (it is cached), give a local folder (hf:/path/to/model), "
                "or use a built-in text model such as bert",
            ) from None
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model", f"hf:{name}",
            f"it cannot be loaded from the Hugging Face Hub ({str(err).strip().splitlines()[0]}); "
            "check the id",
        ) from None


def build_hf(
    name: str, num_classes: int, vocab_size: int | None = None, pretrained: bool = True,
    **config_kwargs: Any,
) -> HFTextClassifier:
    """Build ``hf:<name>`` for ``num_classes`` classes (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = _load(AutoConfig, name, num_labels=num_classes, **config_kwargs)
    if pretrained:
        # a checkpoint with another label count gets a fresh classifier
        model = _load(
            AutoModelForSequenceClassification, name, config=config, ignore_mismatched_sizes=True
        )
    else:
        if vocab_size is not None:
            config.vocab_size = int(vocab_size)
        model = AutoModelForSequenceClassification.from_config(config)
    # from_pretrained returns eval mode and Lightning keeps a module's mode at fit start: a
    # fine-tuned model would train without dropout (issue 21, finding 2). A teacher is put
    # back in eval mode when it is frozen.
    model.train()
    wrapped = HFTextClassifier(model)
    #: trained weights were loaded (an untrained teacher is refused, modules/teacher.py)
    wrapped.kd_pretrained = bool(pretrained)
    check_vocab(wrapped, vocab_size, f"hf:{name}")
    return wrapped


def resolve(name: str) -> Builder:
    """The ``hf`` prefix resolver: ``hf:bert-base-uncased``, ``hf:/path/to/saved/model``."""

    def builder(
        num_classes: int = 2, vocab_size: int | None = None, max_length: int | None = None,
        pretrained: bool = True, **config_kwargs: Any,
    ) -> nn.Module:
        model = build_hf(name, num_classes, vocab_size, pretrained, **config_kwargs)
        limit = getattr(model.model.config, "max_position_embeddings", None)
        if max_length is not None and limit is not None and max_length > limit:
            raise ConfigError(
                "model", f"hf:{name}",
                f"it reads at most {limit} positions but data.max_length is {max_length}; "
                f"set data.max_length <= {limit}",
            )
        return model

    builder.__doc__ = f"Hugging Face {name} for sequence classification."
    return builder


register_prefix("hf", resolve)

__all__ = ["HFTextClassifier", "build_hf", "check_vocab", "resolve"]
