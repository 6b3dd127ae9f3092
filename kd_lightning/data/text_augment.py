"""Tang et al. (2019)'s transfer-set augmentation for text distillation.

"Distilling Task-Specific Knowledge from BERT into Simple Neural Networks" (§3.1) makes
unlabelled sentences for the teacher to label from the training sentences, by three rules:

* **masking**: with probability ``p_mask`` a word becomes the mask token (``[MASK]``);
* **POS-guided word replacement**: with probability ``p_pos`` a word becomes another word
  with the same part-of-speech tag (masking and replacement are exclusive per word);
* **n-gram sampling**: with probability ``p_ng`` the whole synthetic sentence is cut down
  to one random n-gram, n uniform in 1..5.

Each training sentence is rewritten ``n_iter`` times (20 in the paper for SST-2), with
``p_mask = p_pos = 0.1`` and ``p_ng = 0.25``.

Departure: POS tags need a tagger (a model download), which this offline path cannot
assume. ``replace_with: bucket`` replaces a word by a random word of the same *frequency
bucket* (⌊log₂ count⌋ over the train split), which keeps rare words rare and function words
frequent — a frequency proxy for "same kind of word"; ``replace_with: uniform`` draws any
train-vocabulary word. Words are ``\\w+('\\w+)?`` runs and single punctuation marks, and the
rewritten sentence joins them with spaces (the tokenizer splits punctuation anyway).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Literal

import numpy as np

from kd_lightning.data.transfer import TextTransferContext, TextTransferSource
from kd_lightning.errors import ConfigError

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    """The word sequence the augmentation edits."""
    return _WORD.findall(text)


class TextAugmentTransfer(TextTransferSource):
    """``copies`` rewritten copies of each train (or labelled) text, Tang et al. (2019) §3.1.

    Args:
        copies: synthetic texts per source text (the paper's ``n_iter``; 20 for SST-2).
        p_mask: per-word probability of the mask token.
        p_replace: per-word probability of a replacement word (exclusive with masking).
        p_ngram: per-copy probability of keeping only one random n-gram.
        ngram_range: (min, max) n of the sampled n-gram, inclusive.
        replace_with: ``bucket`` = a word of the same train-frequency bucket; ``uniform`` =
            any train-vocabulary word.
        of: which texts to rewrite: the whole ``train`` split or the ``labeled`` subset.
        seed_offset: added to the DataModule's labelled-subset seed, for another draw.
    """

    def __init__(
        self,
        copies: int = 2,
        p_mask: float = 0.1,
        p_replace: float = 0.1,
        p_ngram: float = 0.25,
        ngram_range: tuple[int, int] = (1, 5),
        replace_with: Literal["bucket", "uniform"] = "bucket",
        of: Literal["train", "labeled"] = "train",
        seed_offset: int = 0,
    ) -> None:
        field = "data.extra_transfer"
        if copies < 1:
            raise ConfigError(f"{field}.copies", copies, "use at least 1 copy")
        for name, p in (("p_mask", p_mask), ("p_replace", p_replace), ("p_ngram", p_ngram)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{field}.{name}", p, "use a probability in [0, 1]")
        if p_mask + p_replace > 1.0:
            raise ConfigError(
                f"{field}.p_replace",
                p_replace,
                f"p_mask + p_replace must be at most 1 (p_mask={p_mask})",
            )
        if len(ngram_range) != 2 or not 1 <= ngram_range[0] <= ngram_range[1]:
            raise ConfigError(
                f"{field}.ngram_range",
                ngram_range,
                "use (min, max) with 1 <= min <= max, e.g. [1, 5]",
            )
        if replace_with not in ("bucket", "uniform"):
            raise ConfigError(f"{field}.replace_with", replace_with, "use 'bucket' or 'uniform'")
        if of not in ("train", "labeled"):
            raise ConfigError(f"{field}.of", of, "use 'train' or 'labeled'")
        self.copies = copies
        self.p_mask, self.p_replace, self.p_ngram = float(p_mask), float(p_replace), float(p_ngram)
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.replace_with = replace_with
        self.of = of
        self.seed_offset = seed_offset

    def texts(self, context: TextTransferContext) -> list[str]:
        if self.p_mask > 0 and not context.mask_token:
            raise ConfigError(
                "data.extra_transfer.p_mask",
                self.p_mask,
                "the tokenizer has no mask token; set p_mask: 0",
            )
        rng = np.random.default_rng([context.seed, self.seed_offset])
        train = [words(context.texts[i]) for i in context.train_indices.tolist()]
        pools = self._replacement_pools(train)
        rows = context.train_indices if self.of == "train" else context.labeled_indices
        sources = [words(context.texts[i]) for i in rows.tolist()]
        return [
            self.rewrite(ws, rng, pools, context.mask_token)
            for ws in sources
            for _ in range(self.copies)
        ]

    def _replacement_pools(self, sentences: list[list[str]]) -> dict[str, tuple[np.ndarray, int]]:
        """word → (the words it may be replaced by, its own position among them): its
        frequency bucket, or the whole train vocabulary."""
        counts = Counter(w for ws in sentences for w in ws)
        groups: dict[int, list[str]] = {}
        for w, c in sorted(counts.items()):
            groups.setdefault(
                0 if self.replace_with == "uniform" else int(math.log2(c)), []
            ).append(w)
        pools: dict[str, tuple[np.ndarray, int]] = {}
        for group in groups.values():
            array = np.array(group, dtype=object)
            pools.update((w, (array, i)) for i, w in enumerate(group))
        return pools

    def rewrite(
        self,
        ws: list[str],
        rng: np.random.Generator,
        pools: dict[str, tuple[np.ndarray, int]],
        mask_token: str | None,
    ) -> str:
        """One synthetic sentence from the words ``ws``."""
        out = list(ws)
        draws = rng.random(len(ws))
        for i, (w, u) in enumerate(zip(ws, draws)):
            if u < self.p_mask:
                out[i] = mask_token
            elif u < self.p_mask + self.p_replace:
                pool, own = pools.get(w, (None, 0))
                if pool is not None and len(pool) > 1:  # uniform over the *other* words
                    j = int(rng.integers(len(pool) - 1))
                    out[i] = pool[j + (j >= own)]
        if out and rng.random() < self.p_ngram:
            n = min(int(rng.integers(self.ngram_range[0], self.ngram_range[1] + 1)), len(out))
            start = int(rng.integers(len(out) - n + 1))
            out = out[start : start + n]
        return " ".join(out)
