"""Issue 21: commands that write refuse to replace earlier work without ``--overwrite``
(findings 6, 7 and the store), and store-teacher keeps seed 0 (finding 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from tests.helpers.jpeg_tree import write_jpeg_tree

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_jpeg_tree(tmp_path_factory.mktemp("jpegs"), classes=3, per_class=4)


def _kd_config(tmp_path: Path, tree: Path, seed: object) -> Path:
    cfg = tmp_path / f"kd_{seed}.yaml"
    cfg.write_text(
        f"seed_everything: {seed}\n"
        "model:\n  init_args:\n    teacher: {model: resnet8, allow_untrained: true}\n"
        "data:\n  class_path: kd_lightning.data.ImageFolderDataModule\n"
        f"  init_args: {{data_dir: {tree}, image_size: 32, resize_size: 36, augment_views: 1}}\n"
    )
    return cfg


def _store(cfg: Path, out: Path, *extra: str):
    return main(["data", "store-teacher", "-c", str(cfg), "--output", str(out), "--k", "2",
                 "--device", "cpu", "--stages", "train", *extra])


@pytest.mark.parametrize("seed", [0, 1])
def test_store_teacher_keeps_seed_0_and_1(tree, tmp_path, seed):
    # finding 9: `seed in (None, True, False)` took 0 and 1 for booleans and wrote seed 42
    store = _store(_kd_config(tmp_path, tree, seed), tmp_path / "store")
    assert store.meta["signature"]["seed"] == seed


def test_store_teacher_refuses_an_earlier_store_without_overwrite(tree, tmp_path):
    cfg, out = _kd_config(tmp_path, tree, 0), tmp_path / "store"
    _store(cfg, out)
    before = (out / "train_values.npy").read_bytes()
    with pytest.raises(ConfigError, match=r"--output=.*earlier teacher store: pass --overwrite"):
        _store(cfg, out)
    assert (out / "train_values.npy").read_bytes() == before  # nothing lost
    assert _store(cfg, out, "--overwrite").meta["k"] == 2


def test_data_optimize_refuses_an_earlier_dataset_without_overwrite(tree, tmp_path):
    out = tmp_path / "litdata"
    args = ["data", "optimize", "--data_dir", str(tree), "--output_dir", str(out), "--num_workers", "1"]
    main(args)
    meta = (out / "kd_lightning.json").read_text()
    with pytest.raises(ConfigError, match=r"--output_dir=.*earlier dataset: pass --overwrite"):
        main(args)
    assert (out / "kd_lightning.json").read_text() == meta
    assert main([*args, "--overwrite"])["splits"]["train"] == 12


def test_data_optimize_holdout_is_an_explicit_flag(tree, tmp_path, capsys):
    # finding 12: `--val_dir none` held out the DataModule's 1% without saying so
    out = tmp_path / "held"
    main(["data", "optimize", "--data_dir", str(tree), "--val_dir", "none", "--val_fraction", "0.25",
          "--output_dir", str(out), "--num_workers", "1"])
    assert "holding out 0.25 of train" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--val_fraction.*--val_dir none"):
        main(["data", "optimize", "--data_dir", str(tree), "--val_fraction", "0.25",
              "--output_dir", str(tmp_path / "x"), "--num_workers", "1"])


def test_import_teacher_refuses_an_existing_checkpoint(tmp_path):
    # finding 6: the check comes before the file is even read, so a trained teacher is never lost
    out = tmp_path / "teacher.ckpt"
    torch.save({"trained": True}, out)
    with pytest.raises(ConfigError, match=r"--output=.*teacher\.ckpt.*exists: pass --overwrite"):
        main(["import-teacher", str(tmp_path / "any.pth"), "--format", "repdistiller",
              "--model", "resnet8x4", "-o", str(out)])
    assert torch.load(out) == {"trained": True}


def test_store_teacher_composes_configs_and_data_overrides_like_fit(tree, tmp_path):
    # finding 11: store-teacher kept only the last -c and refused --data.* overrides
    base = _kd_config(tmp_path, tree, 0)
    top = tmp_path / "top.yaml"
    top.write_text("data:\n  init_args: {augment_views: 2}\n")
    store = _store(base, tmp_path / "store", "-c", str(top), "--data.resize_size=40",
                   "--seed_everything", "3")
    sig = store.meta["signature"]
    assert (sig["views"], sig["seed"], sig["resize"]) == (2, 3, 40)
    assert sig["size"] == 32  # from the first config: the second merges into it
    with pytest.raises(ConfigError, match="--trainer.max_epochs.*--data"):
        _store(base, tmp_path / "s2", "--trainer.max_epochs=1")


def test_validate_refuses_a_checkpoint_of_another_module_class(mnist_teacher_ckpt):
    # finding 3: a teacher's ClassifierModule checkpoint under a KD config was validated as
    # the teacher, its accuracy reported as the KD run's val/acc
    with pytest.raises(ConfigError, match=r"ckpt_path=.*ClassifierModule checkpoint.*DistillationModule"):
        main(["validate", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), f"--ckpt_path={mnist_teacher_ckpt}"])
