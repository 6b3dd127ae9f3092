"""LightningCLI entry point: fit/validate/test/predict on tiny configs, config saving."""

from __future__ import annotations

from pathlib import Path

import torch

from kd_lightning.cli import main
from kd_lightning.modules import ClassifierModule, DistillationModule
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


def test_classifier_fit_validate_test_predict(tmp_path):
    base = ["-c", str(CONFIGS / "quickstart" / "scratch.yaml"), *DEBUG_TRAINER,
            *logger_args(tmp_path / "logs")]
    cli = main(["fit", *base, f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    assert isinstance(cli.model, ClassifierModule)
    # links: the data's num_classes/input_shape reached the model
    assert cli.model.hparams.num_classes == 10 and tuple(cli.model.hparams.input_shape) == (1, 28, 28)
    assert "test/acc" in cli.trainer.callback_metrics  # test_after_fit from the config
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    assert ckpt.is_file()
    for sub in ("validate", "test"):
        cli = main([sub, *base, f"--ckpt_path={ckpt}"])
        assert f"{'val' if sub == 'validate' else 'test'}/acc" in cli.trainer.callback_metrics
    cli = main(["predict", *base, f"--ckpt_path={ckpt}"])
    probs = torch.cat(cli.trainer.predict_loop.predictions)
    assert probs.shape[1] == 10 and torch.allclose(probs.sum(1), torch.ones(len(probs)))


def test_kd_fit_logs_student_teacher_agreement(tmp_path, mnist_teacher_ckpt):
    cli = main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), *DEBUG_TRAINER,
        *logger_args(tmp_path / "logs"), f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ])
    assert isinstance(cli.model, DistillationModule)
    metrics = cli.trainer.callback_metrics  # after test_after_fit: the test metrics
    for key in ("test/acc", "test/teacher_acc", "test/agreement", "test/kl_teacher_student"):
        assert key in metrics, key
    logged = (Path(cli.trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    for key in ("train/loss_epoch", "train/loss_kd", "train/loss_ce", "val/acc",
                "val/teacher_acc", "val/agreement"):
        assert key in logged.split(","), key
    # the teacher fixture is trained: on the same test batches it beats chance clearly
    assert metrics["test/teacher_acc"] > 0.5


def test_rerun_in_same_dir_overwrites_saved_config(tmp_path):
    args = ["fit", "-c", str(CONFIGS / "quickstart" / "scratch.yaml"), *DEBUG_TRAINER,
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=same",
            "--trainer.logger.version=fixed", "--test_after_fit=false",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]
    main(args)
    main(args)  # the same log dir again: the saved config must not block the run
    saved = Path(tmp_path / "same" / "fixed" / "config.yaml")
    assert saved.is_file() and "ClassifierModule" in saved.read_text()


def test_last_checkpoint_is_the_final_epoch_even_after_the_best_one(tmp_path):
    """Lightning 2.6 refreshes last.ckpt only together with a new best; ours always does."""
    cli = main(["fit", "-c", str(CONFIGS / "quickstart" / "scratch.yaml"), *DEBUG_TRAINER,
                "--trainer.max_epochs=3", "--trainer.limit_val_batches=1", "--test_after_fit=false",
                "--model.init_args.optimizer.init_args.lr=5.0",  # diverges: best is an early epoch
                *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == cli.trainer.global_step == 6
    assert last["epoch"] == 2


def test_a_stacked_head_config_names_its_own_run(monkeypatch):
    """Issue 21, finding 8: ``-c quickstart/kd.yaml -c kd/dkd.yaml`` used kd's log name and
    checkpoint folder (so the DKD run logged as ``kd`` and set kd's checkpoints aside)."""
    from kd_lightning.preflight import CommandLine, name_stacked_run

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the configs' relative paths
    base, dkd = "configs/quickstart/kd.yaml", "configs/kd/dkd.yaml"
    line = name_stacked_run(CommandLine.split(["fit", "-c", base, "-c", dkd]))
    flags = dict((key, value) for _, key, value in line.items if key)
    assert flags["checkpoint.dirpath"] == "runs/quickstart/kd+dkd"
    assert flags["trainer.logger.init_args.name"] == "kd+dkd"
    # one file, or a run folder the user set, is left as it is
    single = CommandLine.split(["fit", "-c", base])
    assert name_stacked_run(single) is single
    chosen = CommandLine.split(["fit", "-c", base, "-c", dkd, "--checkpoint.dirpath=runs/mine"])
    assert name_stacked_run(chosen) is chosen
