"""Every bad command line or config is one ConfigError naming the field and the fix: no
usage dump, no traceback, exit code 2 from the console, and no checkpoint touched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from tests.conftest import CONFIGS, REPO

KD = str(CONFIGS / "quickstart" / "kd.yaml")
COMPRESS = str(CONFIGS / "compress" / "mnist.yaml")


def error_of(argv: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        main(argv)
    assert "\n" not in str(info.value)
    return info.value


CASES = [  # (flag, field, fragments of the message)
    ("--model.init_args.heads.1.class_path=kd_lightning.losses.KLDivergnce",
     "model.init_args.heads.1", ["no LossHead", "kd_lightning.losses.KLDivergence"]),
    ("--model.init_args.heads.1.init_args.temprature=8",
     "model.init_args.heads.1.init_args.temprature", ["KLDivergence takes no argument", "temperature"]),
    ("--model.init_args.heads.5.init_args.temperature=8",
     "model.init_args.heads.5.init_args.temperature", ["2 element(s)", "0 to 1"]),
    ("--model.init_args.optimizer.class_path=torch.optim.Adamm",
     "model.init_args.optimizer", ["no Optimizer", "torch.optim.Adam"]),
    ("--model.init_args.optimizer.init_args.lr=fast",
     "model.init_args.optimizer.init_args.lr", ["expected float"]),
    ("--model.init_args.lr_scheduler=torch.optim.lr_scheduler.StepLRR",
     "model.init_args.lr_scheduler", ["LRScheduler can be imported", "torch.optim.lr_scheduler.StepLR"]),
    ("--trainer.max_epochs=ten", "trainer.max_epochs", ["expected int | None"]),
    ("--trainer.logger.class_path=lightning.pytorch.loggers.CSVLoger",
     "trainer.logger", ["no Logger", "lightning.pytorch.loggers.CSVLogger"]),
    ("--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStoping",
     "trainer.callbacks.0", ["no Callback", "lightning.pytorch.callbacks.EarlyStopping"]),
    ("--model.init_args.teacher.checkpint=x",
     "model.init_args.teacher.checkpint", ["TeacherSpec takes no argument", "checkpoint"]),
    ("--data.init_args.batch_size=big", "data.init_args.batch_size", ["expected int"]),
    ("--checkpoint.save_top_k=all", "checkpoint.save_top_k", ["expected int"]),
    ("--seed_everything=abc", "seed_everything", ["expected bool | int"]),
    ("--test_after_fit=maybe", "test_after_fit", ["expected bool"]),
    ("--max_epochs=3", "max_epochs", ["no such option", "trainer"]),
    ("--model.init_args.lr_scheduler.init_args.gamma=half", "model.init_args.lr_scheduler.init_args",
     ["set model.init_args.lr_scheduler.class_path too", "torch.optim.lr_scheduler."]),
    ("--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.EarlyStopping, "
     "init_args: {patience: soon}}]", "trainer.callbacks.0.init_args.patience", ["expected int"]),
    ("--trainer.precision=17", "trainer.precision", ["expected", "bf16-mixed"]),
]


@pytest.mark.parametrize(("flag", "field", "fragments"), CASES, ids=[c[1] for c in CASES])
def test_bad_value_or_class_names_the_field(flag, field, fragments):
    err = error_of(["fit", "-c", KD, flag])
    assert err.field == field, str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)


def test_config_file_missing_or_not_yaml(tmp_path):
    err = error_of(["fit", "-c", str(tmp_path / "kd.yml")])
    assert err.field == "--config" and "no such config file" in str(err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: x\n   init_args: [\n")
    err = error_of(["fit", "-c", KD, "-c", str(bad)])
    assert err.field == "--config" and "YAML syntax error at line 3" in str(err)
    bad.write_text("- a\n- b\n")
    assert "mapping" in str(error_of(["validate", "--config", str(bad)]))


def checkpoints(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.glob("*.ckpt")}


def test_bad_ckpt_path_fails_before_any_checkpoint_moves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.ckpt").write_bytes(b"earlier best")
    (run / "last.ckpt").write_bytes(b"earlier last")
    before = checkpoints(run)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 cut short")
    base = ["fit", "-c", KD, f"--checkpoint.dirpath={run}"]
    for ckpt, fragment in ((tmp_path / "nope.ckpt", "no such file"),
                           (truncated, "corrupt or truncated"), (tmp_path, "a directory")):
        err = error_of([*base, f"--ckpt_path={ckpt}"])
        assert err.field == "ckpt_path" and fragment in str(err)
    assert error_of([*base, "--trainer.max_epochs=ten"]).field == "trainer.max_epochs"
    assert checkpoints(run) == before and not (run / "previous").exists()
    assert error_of(["test", "-c", KD, f"--ckpt_path={truncated}"]).field == "ckpt_path"


def test_list_index_flag_sets_one_element(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", KD, "--model.init_args.heads.1.init_args.temperature=8",
              "--model.init_args.heads.0.init_args.weight", "0.2", "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "temperature: 8.0" in printed and "weight: 0.2" in printed
    assert "weight: 0.9" in printed  # the rest of the list is the config's


def test_compress_takes_c_and_names_the_field():
    assert error_of(["compress", "-c", COMPRESS, "--prune.amount=lots"]).field == "prune.amount"
    err = error_of(["compress", "--config", COMPRESS, "--prune.methd=l1"])
    assert err.field == "prune.methd" and "'method'" in str(err)
    err = error_of(["compress", "-c", COMPRESS, "--data=kd_lightning.data.BundledMNISTDataModul"])
    assert err.field == "data" and "kd_lightning.data.BundledMNISTDataModule" in str(err)
    assert error_of(["compress", "-c", "missing.yaml"]).field == "--config"


def test_console_prints_one_line_exit_2_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-c", "from kd_lightning.cli import console_main; console_main()",
         "fit", "-c", KD, "--trainer.max_epochs=ten"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["kd-lightning: error: trainer.max_epochs='ten' is invalid: expected int | None"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["import-teacher"], "arguments are required: file, --format, --model"),
        (["import-teacher", "t.pth", "--format", "repdistiller", "--model", "resnet8", "--bogus"],
         "unrecognized arguments: --bogus"),
        (["experiment", "--name", "x"], "arguments are required"),
        (["experiment", "-c", str(CONFIGS / "experiments" / "smoke.yaml"), "--seeds=many"], "seeds"),
    ],
    ids=["import-teacher-missing", "import-teacher-unknown", "experiment-missing", "experiment-type"],
)
def test_subcommands_answer_bad_input_in_one_line(argv, fragment):
    err = error_of(argv)
    assert fragment in str(err)


def test_data_subcommand_answers_bad_input_in_one_line():
    err = error_of(["data", "optimize"])  # --output_dir is required
    assert "--output_dir" in str(err) and "kd-lightning data optimize --help" in str(err)
