"""Every shipped LightningCLI config parses (--print_config), and the dataset configs
actually run: teacher → scratch → KD on small files in the real MNIST / CIFAR formats."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from kd_lightning.cli import main
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args

# Configs of other commands (their own parsers, tested with those commands: lm_eval holds
# lm-evaluation-harness task YAMLs, tests/test_lm_eval.py), and the reproduction configs,
# which tests/test_repro_configs.py parses and checks against its recipe table.
NOT_LIGHTNING_CLI = {"experiments", "compress", "repro", "lm_eval"}


def _lightning_configs() -> list[Path]:
    return sorted(
        p for p in CONFIGS.rglob("*.yaml")
        if p.relative_to(CONFIGS).parts[0] not in NOT_LIGHTNING_CLI
    )


def _args_for(path: Path) -> list[str]:
    """A complete config alone; a fragment (e.g. configs/kd/at.yaml) on top of a quickstart."""
    doc = yaml.safe_load(path.read_text()) or {}
    model = doc.get("model")
    if isinstance(model, dict) and "class_path" in model:
        return ["-c", str(path)]
    text = path.read_text()
    kd = any(k in text for k in ("heads:", "teacher:", "student:"))
    base = CONFIGS / "quickstart" / ("kd.yaml" if kd else "teacher.yaml")
    return ["-c", str(base), "-c", str(path)]


@pytest.mark.parametrize("path", _lightning_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_print_config(path: Path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args_for(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert "class_path" in printed["model"] and "class_path" in printed["data"]


@pytest.mark.parametrize(
    ("folder", "root_fixture", "batch"), [("mnist", "mnist_root", 16), ("cifar10", "cifar10_root", 8)]
)
def test_dataset_configs_run_teacher_scratch_kd(folder, root_fixture, batch, request, tmp_path):
    root = request.getfixturevalue(root_fixture)
    common = [*DEBUG_TRAINER, f"--data.init_args.data_dir={root}",
              f"--data.init_args.batch_size={batch}", "--data.init_args.num_workers=0",
              "--data.init_args.eval_batch_size=32", *logger_args(tmp_path / "logs")]
    for stage in ("teacher", "scratch"):
        cli = main(["fit", "-c", str(CONFIGS / folder / f"{stage}.yaml"), *common,
                    f"--checkpoint.dirpath={tmp_path / stage}"])
        assert "test/acc" in cli.trainer.callback_metrics
    cli = main(["fit", "-c", str(CONFIGS / folder / "kd.yaml"), *common,
                f"--model.init_args.teacher.checkpoint={tmp_path / 'teacher' / 'best.ckpt'}",
                f"--checkpoint.dirpath={tmp_path / 'kd'}"])
    metrics = cli.trainer.callback_metrics
    assert {"test/acc", "test/teacher_acc", "test/agreement"} <= set(metrics)
