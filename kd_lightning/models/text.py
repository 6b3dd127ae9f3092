"""Text classifiers over token ids: ``bag_of_embeddings``, ``bilstm``, ``kim_cnn``, ``bert``.

Every model reads ``(input_ids, attention_mask)`` (``input_keys``) and ignores padding:
a sample's logits do not change with the amount of padding in its batch. Builders take
``num_classes``, ``vocab_size`` and ``max_length`` from the data plus their own kwargs.

Feature layers (``feature_layers`` on each model):

* ``bag_of_embeddings``: ``embedding`` (B, L, D), ``pool`` (B, D) — the masked mean.
* ``bilstm``: ``embedding`` (B, L, E), ``encoder`` (B, 2H) — both directions' last states,
  ``hidden`` (B, 400) — the ReLU layer before the logits.
* ``kim_cnn``: ``embedding`` (B, L, E), ``pool`` (B, 3·100) — max-pooled n-gram features.
* ``bert``: ``embeddings``, ``hidden.{i}``, ``attention.{i}``, ``pooler`` (see
  ``kd_lightning.models.hf``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from kd_lightning.errors import ConfigError
from kd_lightning.models.hf import HFTextClassifier
from kd_lightning.models.registry import register_model

TEXT_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")


def _positive(field: str, value: int) -> int:
    # the registry re-raises under the caller's field (model.student, …): name the kwarg here
    if int(value) < 1:
        raise ConfigError("model", {field: value}, f"the model kwarg {field} must be >= 1")
    return int(value)


class MaskedMean(nn.Module):
    """Mean of ``x`` (B, L, D) over the positions where ``mask`` (B, L) is 1."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class BagOfEmbeddings(nn.Module):
    """The seed's linear student (fastText-style, Joulin et al. 2017): the mean of the
    unmasked token embeddings, then one linear layer."""

    input_keys = TEXT_INPUTS

    def __init__(self, num_classes: int, vocab_size: int, embed_dim: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, _positive("embed_dim", embed_dim))
        self.pool = MaskedMean()
        self.fc = nn.Linear(embed_dim, num_classes)
        self.feature_layers = ("embedding", "pool")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.fc(self.pool(self.embedding(input_ids), attention_mask))


class BiLSTM(nn.Module):
    """Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural
    Networks": a 1-layer BiLSTM (300-d embeddings, 150 hidden units per direction), the two
    directions' last hidden states concatenated, a ReLU layer of 400 units, then logits.

    Sequences are packed by their lengths (``attention_mask`` sums; right padding), so the
    recurrence never reads padding.
    """

    input_keys = TEXT_INPUTS

    def __init__(
        self, num_classes: int, vocab_size: int, embed_dim: int = 300, hidden_size: int = 150,
        fc_dim: int = 400, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, _positive("embed_dim", embed_dim))
        self.lstm = nn.LSTM(embed_dim, _positive("hidden_size", hidden_size), batch_first=True,
                            bidirectional=True)
        self.encoder = nn.Identity()
        self.hidden = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * hidden_size, _positive("fc_dim", fc_dim)), nn.ReLU()
        )
        self.fc = nn.Linear(fc_dim, num_classes)
        self.feature_layers = ("embedding", "encoder", "hidden")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(
            self.embedding(input_ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = self.lstm(packed)  # h_n: (2, B, H), forward then backward direction
        encoded = self.encoder(torch.cat([h_n[0], h_n[1]], dim=1))
        return self.fc(self.hidden(encoded))


class KimCNN(nn.Module):
    """Kim 2014, "Convolutional Neural Networks for Sentence Classification": filter
    widths 3, 4, 5 with 100 maps each, max-over-time pooling, dropout 0.5, linear logits.

    Padding-aware: padded embeddings are zeroed and each width-``w`` convolution is wide
    (``w - 1`` zeros on both sides), so every window that overlaps a real token sees the
    same inputs whatever the batch's padding; the max is taken over those windows only.
    """

    input_keys = TEXT_INPUTS

    def __init__(
        self, num_classes: int, vocab_size: int, embed_dim: int = 300,
        widths: Sequence[int] = (3, 4, 5), filters: int = 100, dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("model", {"widths": widths}, "give at least one filter width")
        self.widths = tuple(_positive("widths", w) for w in widths)
        self.embedding = nn.Embedding(vocab_size, _positive("embed_dim", embed_dim))
        self.convs = nn.ModuleList(
            nn.Conv1d(embed_dim, _positive("filters", filters), w, padding=w - 1)
            for w in self.widths
        )
        self.pool = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(filters * len(self.widths), num_classes)
        self.feature_layers = ("embedding", "pool")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        emb = self.embedding(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        x = emb.transpose(1, 2)  # (B, E, L)
        lengths = attention_mask.sum(1, keepdim=True)
        pooled = []
        for w, conv in zip(self.widths, self.convs):
            y = torch.relu(conv(x))  # (B, F, L + w - 1)
            # windows 0 … length + w - 2 overlap a real token; later ones see padding only
            valid = torch.arange(y.shape[-1], device=y.device) < lengths + w - 1
            pooled.append(y.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(-1))
        features = self.pool(torch.cat(pooled, dim=1))
        return self.fc(self.dropout(features))


@register_model("bag_of_embeddings", family="text")
def bag_of_embeddings(
    num_classes: int = 2, vocab_size: int = 8000, max_length: int | None = None,
    embed_dim: int = 64,
) -> nn.Module:
    """Mean of token embeddings over unmasked tokens → linear (the seed's linear student)."""
    return BagOfEmbeddings(num_classes, vocab_size, embed_dim)


@register_model("bilstm", family="text")
def bilstm(
    num_classes: int = 2, vocab_size: int = 8000, max_length: int | None = None,
    embed_dim: int = 300, hidden_size: int = 150, fc_dim: int = 400, dropout: float = 0.0,
) -> nn.Module:
    """Tang et al. 2019's BiLSTM student (embedding 300, BiLSTM 150, ReLU FC 400)."""
    return BiLSTM(num_classes, vocab_size, embed_dim, hidden_size, fc_dim, dropout)


@register_model("kim_cnn", family="text")
def kim_cnn(
    num_classes: int = 2, vocab_size: int = 8000, max_length: int | None = None,
    embed_dim: int = 300, widths: Sequence[int] = (3, 4, 5), filters: int = 100,
    dropout: float = 0.5,
) -> nn.Module:
    """Kim 2014's CNN (widths 3/4/5 × 100 filters, max-pool, dropout 0.5)."""
    return KimCNN(num_classes, vocab_size, embed_dim, widths, filters, dropout)


@register_model("bert", family="text")
def bert(
    num_classes: int = 2, vocab_size: int = 8000, max_length: int = 512, layers: int = 4,
    hidden: int = 256, heads: int = 4, intermediate: int | None = None, dropout: float = 0.1,
) -> nn.Module:
    """A BERT of the given size, untrained (``BertForSequenceClassification(BertConfig)``).

    Devlin et al. 2019's architecture with ``layers`` encoder layers of width ``hidden``,
    ``heads`` attention heads and a feed-forward width ``intermediate`` (default 4·hidden);
    positions up to the data's ``max_length``. Same wrapper and feature layers as ``hf:``.
    """
    from transformers import BertConfig, BertForSequenceClassification

    for field, value in (("layers", layers), ("hidden", hidden), ("heads", heads)):
        _positive(field, value)
    if hidden % heads:
        raise ConfigError(
            "model", {"hidden": hidden, "heads": heads},
            "the model kwarg hidden must be a multiple of heads (e.g. hidden 256, heads 4)",
        )
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=max_length,
        num_labels=num_classes,
        pad_token_id=0,
    )
    return HFTextClassifier(BertForSequenceClassification(config))
