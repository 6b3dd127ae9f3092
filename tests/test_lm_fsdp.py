"""FSDP2 (Lightning's ModelParallelStrategy, torch's fully_shard) on 2 CPU processes (gloo),
launched as a user would: ``kd-lightning fit`` with ``configs/trainer/fsdp_cpu.yaml``.

Checks: on both ranks the student *and* the frozen teacher are sharded (DTensor parameters,
each rank holding half of every sharded dimension), the teacher has no gradients and stays
in eval mode; the checkpoint is the student's full state dict (no teacher), equal to the
student gathered from the shards, and loads into a plain 1-process module whose validation
NLL equals the one the 2-rank run logged (float sums reduced over 2 ranks in another order:
1e-5); the same fit under DDP ends at the same student (1e-5); a resume from the
checkpoint continues the fit. Lightning's FSDPStrategy (FSDP1)
refuses CPU; that refusal is checked in one line too.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import CONFIGS, REPO, logger_args
from tests.helpers.lm import tiny_llama

TINY = tiny_llama(2)
DATA = {
    "vocab_size": 400,
    "max_length": 64,
    "min_completion": 12,
    "batch_size": 4,
    "eval_batch_size": 16,
    "max_train_examples": 32,
    "max_eval_examples": 32,
    "val_films": 4,
    "test_films": 4,
}


class DumpShards(L.Callback):
    """Saves, on every rank, what the test compares across ranks."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        def shards(model):
            return {
                n: (
                    type(p).__name__,
                    tuple(p.shape),
                    tuple(p.to_local().shape) if isinstance(p, DTensor) else None,
                    p.requires_grad,
                )
                for n, p in model.named_parameters()
            }

        full = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in pl_module.student.state_dict().items()
        }
        torch.save(
            {
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "student": shards(pl_module.student),
                "teacher": shards(pl_module.teacher),
                "teacher_training": pl_module.teacher.training,
                "student_full": full,
                "global_step": trainer.global_step,
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    from kd_lightning.data.lm import MovieReviewsLMDataModule
    from kd_lightning.modules.lm_distillation import CausalLMModule

    root = tmp_path_factory.mktemp("fsdp")
    dm = MovieReviewsLMDataModule(data_dir=str(root / "data"), **DATA)
    dm.setup()
    torch.manual_seed(1)
    teacher = root / "teacher"
    CausalLMModule("llama", TINY, num_classes=dm.num_classes).model.save_pretrained(teacher)
    dm.tokenizer.save_pretrained(teacher)
    config = root / "kd.yaml"
    import yaml

    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "test_after_fit": False,
                "model": {
                    "class_path": "kd_lightning.modules.lm_distillation.LMDistillationModule",
                    "init_args": {
                        "student": "llama",
                        "student_kwargs": TINY,
                        "teacher": {"model": f"hf:{teacher}"},
                        "chunk_size": 0,
                        "generate_samples": 0,
                    },
                },
                "data": {
                    "class_path": "kd_lightning.data.lm.MovieReviewsLMDataModule",
                    "init_args": {"data_dir": str(root / "data"), **DATA},
                },
                "trainer": {
                    "max_steps": 4,
                    "num_sanity_val_steps": 0,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                },
                "checkpoint": {"filename": "best", "mode": "min", "enable_version_counter": False},
            }
        )
    )
    return root, config, dm


def _fit(out: Path, config: Path, *extra: str, trainer: str = "fsdp_cpu.yaml") -> list[dict]:
    ranks = out / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "kd_lightning",
        "fit",
        "-c",
        str(config),
        "-c",
        str(CONFIGS / "trainer" / trainer),
        *logger_args(out / "logs", "fsdp"),
        f"--checkpoint.dirpath={out / 'ckpt'}",
        "--trainer.callbacks+=tests.test_lm_fsdp.DumpShards",
        f"--trainer.callbacks.out_dir={ranks}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [torch.load(ranks / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow  # three 2-process fits: ~50 s each on 2 loaded cores
def test_fsdp_shards_student_and_teacher_on_two_cpu_processes(lm_setup, tmp_path):
    root, config, dm = lm_setup
    ranks = _fit(tmp_path, config)
    for r in ranks:
        assert r["world_size"] == 2 and r["strategy"] == "ModelParallelStrategy"
        assert r["global_step"] == 4
        for role in ("student", "teacher"):
            params = r[role]
            assert params and all(kind == "DTensor" for kind, *_ in params.values()), role
            # dim 0 sharded over 2 ranks: each holds ceil(n / 2) rows
            for name, (_, full, local, _) in params.items():
                assert local[0] == (full[0] + 1) // 2 and local[1:] == full[1:], (role, name)
        assert all(grad for *_, grad in r["student"].values())
        assert not any(grad for *_, grad in r["teacher"].values())
        assert r["teacher_training"] is False
    for k, v in ranks[0]["student_full"].items():  # the gathered student is one model
        assert torch.equal(ranks[1]["student_full"][k], v), k

    ckpt = tmp_path / "ckpt" / "best.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and not any("teacher" in k for k in state)
    for k, v in ranks[0]["student_full"].items():
        assert torch.equal(state[f"student.{k}"], v), k

    from kd_lightning.modules.lm_distillation import LMDistillationModule

    with open(tmp_path / "logs" / "fsdp" / "version_0" / "metrics.csv") as fh:
        logged = [row for row in csv.DictReader(fh) if row.get("val/nll")][-1]
    single = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).validate(
        LMDistillationModule.load_from_checkpoint(ckpt, weights_only=False),
        datamodule=dm,
        verbose=False,
    )[0]
    print("2-rank FSDP val/nll", logged["val/nll"], "1-process", single["val/nll"])
    assert abs(float(logged["val/nll"]) - single["val/nll"]) <= 1e-5

    # the same 2-rank fit under DDP (same sampler, seeds and global batch; DDP's gradient is
    # tested equal to one process on the whole batch in test_lm_module.py) ends at the same
    # student: FSDP's reduce-scatter only sums in another order (AdamW, 4 steps: 1e-5)
    ddp = _fit(
        tmp_path / "ddp",
        config,
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.precision=32-true",
        trainer="ddp.yaml",
    )
    assert ddp[0]["strategy"] == "DDPStrategy"
    for k, v in ranks[0]["student_full"].items():
        torch.testing.assert_close(ddp[0]["student_full"][k], v, rtol=0, atol=1e-5)

    # resume the sharded fit from its full-state checkpoint
    resumed = _fit(tmp_path, config, "--trainer.max_steps=6", f"--ckpt_path={ckpt}")
    assert resumed[0]["global_step"] == 6 == resumed[1]["global_step"]


def test_lightning_fsdp1_strategy_refuses_cpu_in_one_line():
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp")


def test_chunked_loss_is_refused_under_sharding():
    from kd_lightning.errors import ConfigError
    from kd_lightning.modules.sharding import shard_distiller

    class Stub:
        chunk_size = 256

    with pytest.raises(ConfigError, match="model.chunk_size"):
        shard_distiller(Stub(), mesh=object())


def test_gpu_lm_fsdp_benchmark_runs_its_cpu_smoke(tmp_path):
    """The GPU check script, on one CPU process with tiny models: every setting shards (or
    not) as it says and reports a throughput."""
    import json

    out = tmp_path / "fsdp.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_lm_fsdp",
        "--accelerator",
        "cpu",
        "--batch",
        "2",
        "--length",
        "16",
        "--vocab",
        "64",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["settings"]
    assert not rows["single_bf16_true"]["student_sharded"]
    for name in ("fsdp_bf16_true", "fsdp_bf16_mixed"):
        assert rows[name]["student_sharded"] and rows[name]["teacher_sharded"], name
    assert rows["fsdp_bf16_true"]["student_dtype"] == "torch.bfloat16"
    assert rows["fsdp_bf16_true"]["teacher_dtype"] == "torch.bfloat16"
    assert all(r["tokens_per_s"] > 0 and r["last_loss"] == r["last_loss"] for r in rows.values())


def test_slurm_fsdp_script_renders_the_multinode_fit(tmp_path):
    """scripts/slurm_lm_fsdp.sh under a fake ``srun`` (no cluster here) with SLURM's variables
    for 2 nodes × 8 GPUs: the command it starts resolves (``--print_config``) to FSDP2 over all
    16 GPUs in bf16 with the chunked loss off, and SLURMEnvironment reads the ranks srun gives."""
    import re

    import yaml
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    script = (REPO / "scripts" / "slurm_lm_fsdp.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, re.M))
    assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"]  # one process per GPU
    assert sbatch["signal"].startswith("SIGUSR1") and "requeue" in script

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv = tmp_path / "argv"
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {argv}\n')
    (bin_dir / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8"}
    recipe = "configs/llm/recipes/qwen2.5-1.5b_0.5b_dolly_jsd.yaml"
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(
        ["bash", "scripts/slurm_lm_fsdp.sh", "-c", recipe],
        cwd=REPO,
        env=env,
        check=True,
        timeout=60,
    )
    cmd = argv.read_text().splitlines()
    assert cmd[:2] == ["kd-lightning", "fit"] and cmd[2:4] == ["-c", recipe]  # user's first
    printed = subprocess.run(
        [sys.executable, "-m", "kd_lightning", *cmd[1:], "--print_config"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    config = yaml.safe_load(printed.stdout)
    trainer = config["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert trainer["strategy"]["init_args"]["data_parallel_size"] == 16
    assert trainer["strategy"]["init_args"]["tensor_parallel_size"] == 1
    assert trainer["strategy"]["init_args"]["save_distributed_checkpoint"] is False
    assert (trainer["num_nodes"], int(trainer["devices"])) == (2, 8)
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-true"
    assert config["model"]["init_args"]["chunk_size"] == 0
    assert config["model"]["init_args"]["student"] == "hf:models/Qwen2.5-0.5B-Instruct"

    # what srun sets for task 9 of 16 (node 1, local rank 1): Lightning's SLURM environment
    task = {
        "SLURM_NTASKS": "16",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NAME": "kd-lm-fsdp",
        "SLURM_NODELIST": "gpu[01-02]",
        "SLURM_JOB_ID": "42",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in task.items():
            mp.setenv(k, v)
        assert SLURMEnvironment.detect()
        slurm_env = SLURMEnvironment()
        assert (
            slurm_env.world_size(),
            slurm_env.global_rank(),
            slurm_env.local_rank(),
            slurm_env.node_rank(),
        ) == (16, 9, 1, 1)
        assert slurm_env.main_address == "gpu01" and slurm_env.creates_processes_externally
