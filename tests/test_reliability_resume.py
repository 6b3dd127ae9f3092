"""Resume and determinism: a KD fit killed mid-epoch (SIGTERM, SIGKILL) and resumed from
``last.ckpt`` ends exactly where an uninterrupted run ends; the same seed gives the same run.

The fits run in subprocesses through the console entry point, as a scheduler runs them.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.modules.teacher import TeacherSpec, build_teacher, fingerprint
from tests.conftest import CONFIGS, DEBUG_TRAINER, REPO, logger_args

CONSOLE = "from kd_lightning.cli import console_main; console_main()"
#: 2 epochs × 6 steps; last.ckpt refreshed every 2 steps (what SIGKILL resumes from)
RUN = [
    "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), *DEBUG_TRAINER,
    "--trainer.max_epochs=2", "--trainer.limit_train_batches=6",
    "--trainer.deterministic=true", "--trainer.log_every_n_steps=1",
    "--checkpoint.every_n_train_steps=2", "--test_after_fit=false", "--seed_everything=7",
]


def kd_fit(out: Path, teacher: Path, *extra: str, fault: tuple[int, str] | None = None):
    args = [*RUN, f"--model.teacher.checkpoint={teacher}", f"--checkpoint.dirpath={out / 'ckpt'}",
            *logger_args(out / "logs", "kd"), *extra]
    if fault is not None:
        args += ["--trainer.callbacks+=tests.helpers.faults.SignalAtStep",
                 f"--trainer.callbacks.step={fault[0]}", f"--trainer.callbacks.signal={fault[1]}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", CONSOLE, *args], capture_output=True, text=True,
                          env=env, timeout=600)


def metrics(out: Path) -> dict[tuple[str, str], float]:
    """(metric, step) → value over every CSV version (a resumed run logs a new version)."""
    rows: dict[tuple[str, str], float] = {}
    for path in sorted((out / "logs").rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            rows.update({(k, row["step"]): float(v) for k, v in row.items() if v and k != "step"})
    return rows


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_teacher_ckpt) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    result = kd_fit(out, mnist_teacher_ckpt)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_run(resumed: Path, reference: Path, whole_epoch_end: str) -> None:
    a, b = load(resumed / "ckpt" / "last.ckpt"), load(reference / "ckpt" / "last.ckpt")
    # (loop counters may differ: a resumed process saves its last step after validation)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in b["state_dict"].items():  # bit-identical student and adapters
        assert torch.equal(a["state_dict"][key], value), key
    for key, value in b["optimizer_states"][0]["state"].items():
        assert torch.equal(a["optimizer_states"][0]["state"][key]["exp_avg"], value["exp_avg"])
    got, want = metrics(resumed), metrics(reference)
    # every logged value: per-step losses, validation metrics, and the train/* epoch means
    # of both epochs, the interrupted one included (its running sums and train-metric
    # states are in the mid-epoch checkpoint)
    interrupted = [k for k in want if k[0].startswith("train/") and "_step" not in k[0] and k[1] != whole_epoch_end]
    assert len(want) > 20 and interrupted
    assert {k: got.get(k) for k in want} == want
    # beyond them only the teacher's one-off summary, which each process logs once
    assert all(k[0].startswith("teacher/") for k in set(got) - set(want))


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(tmp_path, mnist_teacher_ckpt, reference):
    killed = kd_fit(tmp_path, mnist_teacher_ckpt, fault=(9, "SIGTERM"))
    # Lightning's signal handling + PreemptionCheckpoint: last.ckpt at the step boundary,
    # then a clean exit with 128 + SIGTERM so a scheduler sees an unfinished run
    assert killed.returncode == 143, killed.stderr[-3000:]
    assert "resume with --ckpt_path=last" in killed.stderr
    saved = load(tmp_path / "ckpt" / "last.ckpt")
    assert (saved["epoch"], saved["global_step"]) == (1, 9)  # mid-epoch: 3 of 6 batches
    assert saved["BundledMNISTDataModule"]["train_order"] == {
        "seed": 7, "num_samples": 3500, "epoch": 1, "consumed": 3 * 64,
    }
    # the teacher is not in the checkpoint: it is rebuilt from its source on resume, and
    # the stored fingerprint proves it is the same teacher
    assert not any(k.startswith(("teacher", "_teachers")) for k in saved["state_dict"])
    rebuilt = build_teacher(TeacherSpec(checkpoint=str(mnist_teacher_ckpt)), 10, 1, "model.teacher")
    assert saved["kd_teacher_fingerprints"] == [fingerprint(rebuilt)]

    resumed = kd_fit(tmp_path, mnist_teacher_ckpt, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr
    assert load(tmp_path / "ckpt" / "last.ckpt")["kd_teacher_fingerprints"] == [fingerprint(rebuilt)]
    assert_same_run(tmp_path, reference, whole_epoch_end="5")


@pytest.mark.slow
def test_sigkill_resumes_from_last_step_checkpoint(tmp_path, mnist_teacher_ckpt, reference):
    killed = kd_fit(tmp_path, mnist_teacher_ckpt, fault=(5, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL
    # refreshed every 2 steps even before the first validation (Lightning alone would defer
    # it until the monitored val metric exists), and intact: written atomically
    saved = load(tmp_path / "ckpt" / "last.ckpt")
    assert (saved["epoch"], saved["global_step"]) == (0, 4)  # mid-epoch 0

    resumed = kd_fit(tmp_path, mnist_teacher_ckpt, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, reference, whole_epoch_end="11")


def test_same_seed_and_config_twice_is_identical(tmp_path, mnist_teacher_ckpt):
    from kd_lightning.cli import main

    def run(name: str) -> dict:
        cli = main([
            *RUN[:3], *DEBUG_TRAINER, "--trainer.limit_train_batches=4",
            "--trainer.deterministic=true", "--test_after_fit=false",
            f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
            f"--checkpoint.dirpath={tmp_path / name}", *logger_args(tmp_path / name / "logs"),
        ])
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}

    first, second = run("a"), run("b")
    assert "val/acc" in first and "train/loss_epoch" in first
    assert first == second


def test_resume_refuses_a_different_teacher(tmp_path, mnist_teacher_ckpt):
    """The teacher file was replaced (e.g. retrained into the same path) between a fit and
    its resume: resuming would silently change the experiment, so it is refused."""
    import shutil

    from kd_lightning.cli import main

    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(mnist_teacher_ckpt, teacher)
    args = [*RUN[:3], *DEBUG_TRAINER, "--test_after_fit=false", f"--model.teacher.checkpoint={teacher}",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}", *logger_args(tmp_path / "logs")]
    main(args)
    retrained = load(teacher)  # same architecture, other weights
    retrained["state_dict"] = {k: v + 0.01 for k, v in retrained["state_dict"].items()}
    torch.save(retrained, teacher)
    # an explicit path: LightningCLI rebuilds the model from the checkpoint's hparams, so
    # the teacher is re-loaded from the path it was trained with
    resume = [*args, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", "--trainer.max_epochs=2"]
    with pytest.raises(ConfigError, match=r"model\.teacher=.*not the teacher this checkpoint") as err:
        main(resume)
    assert "allow_teacher_change" in err.value.fix
    # the override (not saved in the checkpoint) continues against the new teacher
    with pytest.warns(UserWarning, match="differs from the one this checkpoint"):
        main([*resume, "--model.allow_teacher_change=true"])


def test_sigterm_during_validation_finishes_it_then_saves(tmp_path, mnist_teacher_ckpt):
    """In-process (Lightning's handler catches the signal): the validation under way runs to
    its end, so the saved epoch has whole metrics, then the fit stops."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from kd_lightning.cli import main

    with pytest.raises(SIGTERMException):
        main([
            *RUN[:3], *DEBUG_TRAINER, "--trainer.limit_val_batches=3", "--data.eval_batch_size=100",
            "--test_after_fit=false",
            "--trainer.max_epochs=3", f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}", *logger_args(tmp_path / "logs"),
            "--trainer.callbacks+=tests.helpers.faults.SignalAtStep",
            "--trainer.callbacks.step=2", "--trainer.callbacks.during=validation",
        ])
    saved = load(tmp_path / "ckpt" / "last.ckpt")
    assert (saved["epoch"], saved["global_step"]) == (0, 2)  # stopped after epoch 0 of 3
    val = saved["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["current"]
    assert val["completed"] == 3  # all 3 validation batches ran after the signal
    assert not list((tmp_path / "ckpt").glob("last-v*.ckpt"))  # one last.ckpt, not two


# -- every DataModule ------------------------------------------------------------------------
def _datamodule_args(kind: str, root: Path) -> list[str]:
    """A tiny fit's data and model for each kd-lightning DataModule, on files in its real
    on-disk format (ImageFolder JPEGs, CIFAR pickles, LitData chunks, a HF DatasetDict)."""
    from kd_lightning.cli import main
    from tests.helpers.fake_data import write_cifar10
    from tests.helpers.jpeg_tree import write_jpeg_tree
    from tests.test_text_data import write_toy_dataset

    image = ["--data.init_args.image_size=16", "--data.init_args.resize_size=18",
             "--data.init_args.num_workers=0", "--model.model=resnet8"]
    if kind == "mnist":
        return ["--model.model=mlp_tiny", "--data=kd_lightning.data.BundledMNISTDataModule",
                "--data.init_args.batch_size=16", "--data.init_args.eval_batch_size=50"]
    if kind == "cifar":
        return ["--model.model=resnet8", "--data=kd_lightning.data.CIFAR10DataModule",
                f"--data.init_args.data_dir={write_cifar10(root / 'cifar')}",
                "--data.init_args.batch_size=16", "--data.init_args.num_workers=0"]
    if kind in ("imagefolder", "streaming"):
        tree = write_jpeg_tree(root / "jpegs", classes=3, per_class=6)
        if kind == "imagefolder":
            return ["--data=kd_lightning.data.ImageFolderDataModule", *image,
                    f"--data.init_args.data_dir={tree}", "--data.init_args.batch_size=4"]
        main(["data", "optimize", "--data_dir", str(tree), "--output_dir", str(root / "litdata"),
              "--num_workers", "1"])
        # deterministic views: a stream has no per-step RNG seeding, so fresh-random crops
        # would differ after a resume (the streaming module's documented exact-resume path)
        return ["--data=kd_lightning.data.StreamingImageDataModule", *image,
                f"--data.init_args.input_dir={root / 'litdata'}", "--data.init_args.batch_size=4",
                "--data.init_args.augment_views=2"]
    return ["--model.model=bag_of_embeddings", "--model.model_kwargs={embed_dim: 8}",
            "--data=kd_lightning.data.HFTextDataModule", "--data.init_args.dataset=toy",
            f"--data.init_args.data_dir={write_toy_dataset(root / 'text')}",
            "--data.init_args.vocab_size=200", "--data.init_args.max_length=16",
            "--data.init_args.batch_size=16"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mnist", "cifar", "imagefolder", "streaming", "text"])
def test_sigkill_mid_epoch_resumes_to_the_same_end_for_every_datamodule(tmp_path, kind):
    """Killed with SIGKILL one step after the step-4 checkpoint (1 batch into epoch 1 of 3 ×
    3 steps), then resumed: the same final step and the same test metrics as a run never
    interrupted. (The streaming case failed before the fix of issue 21, finding 1: its
    resumed fit stopped at step 6, after the resumed epoch.)"""
    from kd_lightning.cli import main

    data = _datamodule_args(kind, tmp_path)

    def args(out: Path) -> list[str]:
        return [
            "fit", "--model=kd_lightning.modules.ClassifierModule", *data, *DEBUG_TRAINER,
            "--trainer.max_epochs=3", "--trainer.limit_train_batches=3",
            "--trainer.deterministic=true", "--checkpoint.every_n_train_steps=2",
            "--seed_everything=3", "--test_after_fit=true", f"--checkpoint.dirpath={out / 'ckpt'}",
            *logger_args(out / "logs"),
        ]

    def run(*extra: str) -> dict[str, float]:
        cli = main([*args(tmp_path / "killed"), *extra])
        assert cli.trainer.global_step == 9
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}

    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    killed = subprocess.run(
        [sys.executable, "-c", CONSOLE, *args(tmp_path / "killed"),
         "--trainer.callbacks+=tests.helpers.faults.SignalAtStep",
         "--trainer.callbacks.step=5", "--trainer.callbacks.signal=SIGKILL"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = load(tmp_path / "killed" / "ckpt" / "last.ckpt")
    assert (saved["epoch"], saved["global_step"]) == (1, 4)  # mid-epoch 1
    resumed = run("--ckpt_path=last")
    main_out = tmp_path / "reference"
    cli = main(args(main_out))
    reference = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    assert cli.trainer.global_step == 9 and "test/acc" in reference
    assert resumed == reference
