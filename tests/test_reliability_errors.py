"""Issue 21, "errors that are still tracebacks": third-party exceptions on bad user input go
through one translation point (``kd_lightning.translate``) and come out as the one-line
ConfigError naming the field the user set (exit 2 from the console); ``--help`` lists every
subcommand (issue 22)."""

from __future__ import annotations

import sys

import pytest

from kd_lightning.cli import COMMAND_HELP, EXTRA_COMMANDS, RUN_COMMANDS, console_main, main
from kd_lightning.errors import ConfigError
from kd_lightning.translate import translate
from tests.conftest import CONFIGS
from tests.helpers.jpeg_tree import write_jpeg_tree

SCRATCH = str(CONFIGS / "quickstart" / "scratch.yaml")


def _one_line(argv: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        main(argv)
    assert "\n" not in str(info.value), str(info.value)
    return info.value


def test_help_lists_every_subcommand_with_one_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert set(COMMAND_HELP) == set(RUN_COMMANDS) | set(EXTRA_COMMANDS)
    for name in COMMAND_HELP:
        assert f"  {name} " in out


def test_gpu_accelerator_without_a_gpu_names_trainer_accelerator(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so accelerator=gpu is valid here")
    monkeypatch.chdir(tmp_path)
    err = _one_line(["fit", "-c", SCRATCH, "--trainer.accelerator=gpu", "--trainer.fast_dev_run=1"])
    assert err.field == "trainer.accelerator" and "'gpu'" in str(err) and "auto" in str(err)


def test_nan_learning_rate_names_the_optimizer_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _one_line(
        [
            "fit",
            "-c",
            SCRATCH,
            "--model.init_args.optimizer.init_args.lr=nan",
            "--trainer.fast_dev_run=1",
            "--test_after_fit=false",
        ]
    )
    assert err.field == "model.init_args.optimizer.init_args.lr" and "nan" in str(err)


def test_unreadable_jpeg_in_a_worker_is_one_line(tmp_path, monkeypatch):
    root = write_jpeg_tree(tmp_path / "tree", classes=2, per_class=2)
    (root / "train" / "class_0" / "img_1.JPEG").write_bytes(b"\xff\xd8 truncated")
    monkeypatch.chdir(tmp_path)
    err = _one_line(
        [
            "fit",
            "--model=kd_lightning.modules.ClassifierModule",
            "--model.model=mlp_tiny",
            "--data=kd_lightning.data.ImageFolderDataModule",
            f"--data.init_args.data_dir={root}",
            "--data.init_args.image_size=16",
            "--data.init_args.resize_size=18",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=1",
            "--trainer.fast_dev_run=1",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
        ]
    )
    assert "img_1.JPEG" in str(err) and "not a readable image" in str(err)
    assert "Traceback" not in str(err)


def test_unknown_exceptions_keep_their_traceback():
    assert translate(KeyError("something else")) is None
    assert (
        translate(RuntimeError("Caught KeyError in DataLoader worker process 0.\nKeyError: 3"))
        is None
    )


def test_console_exit_2_for_a_translated_error(tmp_path, monkeypatch, capsys):
    # in-process (a subprocess costs ~19 s of imports); test_cli_errors runs the real script
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "kd-lightning",
            "fit",
            "-c",
            SCRATCH,
            "--trainer.fast_dev_run=1",
            "--model.init_args.optimizer.init_args.lr=nan",
        ],
    )
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("kd-lightning:")
    ]
    assert len(lines) == 1 and "model.init_args.optimizer.init_args.lr='nan'" in lines[0], lines


# -- corrupt Hugging Face data and a missing label column (HFTextDataModule) ----------------------
def _toy(tmp_path, layout="save_to_disk"):
    from tests.test_text_data import toy_dm, write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy", layout=layout)
    return root, toy_dm


def test_truncated_dataset_dict_json_names_data_dir(tmp_path):
    root, toy_dm = _toy(tmp_path)
    index = root / "toy" / "dataset_dict.json"
    index.write_text(index.read_text()[:7])
    with pytest.raises(ConfigError, match=r"^data\.data_dir=.*cannot be read") as info:
        toy_dm(root).setup("fit")
    assert "\n" not in str(info.value)


def test_garbage_parquet_names_data_dir(tmp_path):
    root, toy_dm = _toy(tmp_path, layout="parquet")
    for shard in (root / "toy").rglob("*.parquet"):
        shard.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(ConfigError, match=r"^data\.data_dir=.*cannot be read"):
        toy_dm(root).setup("fit")


def test_missing_label_column_is_named_before_the_class_count_reads_it(tmp_path):
    root, toy_dm = _toy(tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.label_column='stars'.*no such column"):
        _ = toy_dm(root, label_column="stars").num_classes


# -- messages name the field the user set ---------------------------------------------------------
def test_missing_image_root_names_data_dir(tmp_path):
    from kd_lightning.data.imagefolder import ImageFolderDataModule

    with pytest.raises(ConfigError, match=r"^data\.data_dir=.*no such folder"):
        ImageFolderDataModule(str(tmp_path / "missing"))


def test_store_topk_errors_name_model_performance_store_topk(tmp_path):
    from kd_lightning.data.imagefolder import ImageFolderDataModule
    from kd_lightning.modules.performance import Performance

    root = write_jpeg_tree(tmp_path / "tree", classes=2, per_class=2)
    dm = ImageFolderDataModule(str(root), image_size=16, resize_size=18, augment_views=1)
    store = Performance(teacher_cache="disk", store_dir=str(tmp_path / "s"), store_topk=5)
    with pytest.raises(
        ConfigError, match=r"^model\.performance\.store_topk=5 .*k <= the 2 classes"
    ):
        store.make_cache(2).bind(dm, 2, ["t"])


def test_truncated_litdata_index_json_names_input_dir(tmp_path):
    from kd_lightning.data.streaming import StreamingImageDataModule

    root = write_jpeg_tree(tmp_path / "tree", classes=2, per_class=2)
    out = tmp_path / "stream"
    main(
        [
            "data",
            "optimize",
            "--data_dir",
            str(root),
            "--output_dir",
            str(out),
            "--num_workers",
            "1",
        ]
    )
    index = out / "train" / "index.json"
    index.write_text(index.read_text()[:20])
    with pytest.raises(
        ConfigError, match=r"^data\.input_dir=.*train/index\.json is not valid JSON"
    ):
        StreamingImageDataModule(str(out), image_size=16, resize_size=18).setup("fit")


def test_compress_refuses_a_text_student_without_calling_tokens_channels(tmp_path):
    import torch

    from kd_lightning.compress.pipeline import load_student

    ckpt = tmp_path / "text.ckpt"  # the layout a text ClassifierModule checkpoint has
    hp = {"model": "text_cnn", "num_classes": 2, "input_shape": [64], "vocab_sizes": {"text": 200}}
    torch.save({"hyper_parameters": hp, "state_dict": {}}, ckpt)
    with pytest.raises(ConfigError, match=r"^checkpoint=.*reads token ids.*image students") as info:
        load_student(str(ckpt))
    assert "channel" not in str(info.value)
