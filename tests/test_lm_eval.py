"""``kd-lightning lm-eval``: lm-eval's harness on the student of a kd-lightning LM checkpoint,
with the bundled local tasks (configs/lm_eval) and no network."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.cli import console_main, main
from kd_lightning.errors import ConfigError
from tests.conftest import REPO
from tests.helpers.lm import tiny_llama

TINY = tiny_llama(2)
#: the quickstart's film split and prompt (12 val / 12 test films, seed 0, plot_chars 160)
DATA = dict(
    vocab_size=400,
    plot_chars=160,
    max_length=64,
    min_completion=12,
    batch_size=8,
    eval_batch_size=16,
    max_train_examples=32,
    max_eval_examples=16,
    val_films=12,
    test_films=12,
    seed=0,
)
TASKS = "movie_reviews_completion,movie_reviews_choice"
#: lm-eval on the best checkpoint when the fit ends
CALLBACK = [
    "--trainer.callbacks+=kd_lightning.callbacks.LMEvalCallback",
    "--trainer.callbacks.tasks=movie_reviews_choice",
    "--trainer.callbacks.bootstrap_iters=0",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step LMDistillationModule fit (tiny student, random hf: teacher folder), run as
    the quickstart is: relative paths from its working directory."""
    from kd_lightning.data.lm import MovieReviewsLMDataModule
    from kd_lightning.modules.lm_distillation import CausalLMModule

    root = tmp_path_factory.mktemp("lm_eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        dm = MovieReviewsLMDataModule(data_dir="data", **DATA)
        torch.manual_seed(1)
        CausalLMModule("llama", TINY, num_classes=dm.num_classes).model.save_pretrained("teacher")
        dm.tokenizer.save_pretrained("teacher")
        config = {
            "seed_everything": 0,
            "model": {
                "class_path": "kd_lightning.modules.lm_distillation.LMDistillationModule",
                "init_args": {
                    "student": "llama",
                    "student_kwargs": TINY,
                    "teacher": {"model": "hf:teacher"},
                    "generate_samples": 0,
                },
            },
            "data": {
                "class_path": "kd_lightning.data.lm.MovieReviewsLMDataModule",
                "init_args": {"data_dir": "data", **DATA},
            },
            "trainer": {
                "accelerator": "cpu",
                "max_epochs": 1,
                "limit_train_batches": 2,
                "limit_val_batches": 1,
                "num_sanity_val_steps": 0,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "logger": False,
            },
            "checkpoint": {
                "dirpath": "ckpt",
                "filename": "best",
                "mode": "min",
                "enable_version_counter": False,
            },
        }
        Path("kd.yaml").write_text(yaml.safe_dump(config))
        main(["fit", "-c", "kd.yaml", *CALLBACK, "--trainer.callbacks.limit=4"])
        dm.setup()
    assert (root / "ckpt" / "best.ckpt").is_file()
    return root, dm


def _expected_bits_per_byte(rows: list[dict]) -> float:
    """The completions' log-likelihood under the checkpoint's student, computed here: the
    prompt + " " + review encoded whole and split at the prompt's length (as lm-eval does)."""
    from transformers import AutoTokenizer

    from kd_lightning.modules.lm_distillation import LMDistillationModule

    student = LMDistillationModule.load_from_checkpoint(
        "ckpt/best.ckpt", weights_only=False
    ).student.eval()
    tok = AutoTokenizer.from_pretrained("data/bpe-400-seed0")
    total_ll, total_bytes = 0.0, 0
    for row in rows:
        cont = " " + row["completion"]
        ids = tok(row["prompt"] + cont, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = student(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        total_ll += sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))
        total_bytes += len(cont.encode("utf-8"))
    return -total_ll / total_bytes / math.log(2)


def test_lm_eval_scores_the_students_checkpoint_on_local_tasks(run_dir, monkeypatch):
    root, _ = run_dir
    monkeypatch.chdir(root)
    args = ["lm-eval", "--ckpt", "ckpt/best.ckpt", "--tasks", TASKS, "--limit", "8"]
    args += ["--output", "eval/student.json", "--device", "cpu", "--bootstrap-iters", "0"]
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    record = main(args)
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # restored after the command
    saved = json.loads(Path("eval/student.json").read_text())
    assert saved["tasks"] == record["tasks"]

    completion = saved["tasks"]["movie_reviews_completion"]
    choice = saved["tasks"]["movie_reviews_choice"]
    assert saved["n_samples"]["movie_reviews_completion"] == {"original": 386, "effective": 8}
    for value in (completion["bits_per_byte"], completion["byte_perplexity"], choice["acc"]):
        assert math.isfinite(value)
    assert 0 <= choice["acc"] <= 1 and 0 <= choice["acc_norm"] <= 1
    assert (choice["acc"] * 8).is_integer()
    # the harness scored the checkpoint's trained student with the run's tokenizer
    rows = [json.loads(line) for line in Path("data/lm_eval/movie_reviews_test.jsonl").open()]
    expected = _expected_bits_per_byte(rows[:8])
    print("bits/byte: lm-eval", completion["bits_per_byte"], "recomputed", expected)
    assert completion["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    assert completion["byte_perplexity"] == pytest.approx(
        2 ** completion["bits_per_byte"], rel=1e-6
    )
    assert saved["checkpoint"]["module"] == "LMDistillationModule"
    assert saved["checkpoint"]["model"] == "llama" and saved["checkpoint"]["vocab_size"] <= 400
    assert saved["tokenizer"] == "data/bpe-400-seed0"

    prov = saved["provenance"]
    assert prov["command"].startswith("kd-lightning lm-eval --ckpt ckpt/best.ckpt")
    assert prov["git_commit"] and "git_dirty" in prov and prov["machine"]["cpu_model"]
    assert "configs/lm_eval/movie_reviews_completion.yaml" in prov["config_files"]
    assert "configs/lm_eval/movie_reviews.py" in prov["config_files"]

    # an existing result is never replaced silently
    with pytest.raises(ConfigError) as info:
        main(args)
    assert info.value.field == "--output" and "--overwrite" in str(info.value)
    record = main([*args[:4], "movie_reviews_choice", "--limit", "2", *args[7:], "--overwrite"])
    saved = json.loads(Path("eval/student.json").read_text())
    assert list(saved["tasks"]) == ["movie_reviews_choice"] and saved["settings"]["limit"] == 2


def test_the_callback_evaluated_the_best_checkpoint_when_the_fit_ended(run_dir):
    root, _ = run_dir
    result = json.loads((root / "ckpt" / "best.lm_eval.json").read_text())
    digest = hashlib.sha256((root / "ckpt" / "best.ckpt").read_bytes()).hexdigest()
    assert result["checkpoint"]["sha256"] == digest
    assert list(result["tasks"]) == ["movie_reviews_choice"] and result["settings"]["limit"] == 4
    assert 0 <= result["tasks"]["movie_reviews_choice"]["acc"] <= 1
    assert result["provenance"]["command"].startswith("kd-lightning lm-eval --ckpt ")


def test_unknown_task_is_one_line_naming_tasks_and_the_fix(run_dir, monkeypatch, capsys):
    root, _ = run_dir
    monkeypatch.chdir(root)
    argv = ["kd-lightning", "lm-eval", "--ckpt", "ckpt/best.ckpt", "--tasks"]
    monkeypatch.setattr(sys, "argv", [*argv, "movie_reviews_completon", "--output", "x.json"])
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kd-lightning")]
    assert len(lines) == 1, lines
    assert "--tasks='movie_reviews_completon'" in lines[0]
    assert "closest: movie_reviews_completion" in lines[0] and "--include-path" in lines[0]
    assert time.perf_counter() - start < 30  # a text scan, not lm-eval's 12 s catalogue index
    assert not Path("x.json").exists()
    # in a fit, the callback refuses it before training
    with pytest.raises(ConfigError) as err:
        main(["fit", "-c", "kd.yaml", *CALLBACK[:1], "--trainer.callbacks.tasks=no_such_task"])
    assert err.value.field == "--tasks" and err.value.value == "no_such_task"


@pytest.mark.timeout(120)
def test_task_whose_data_is_on_the_hub_fails_at_once_offline(run_dir, tmp_path, monkeypatch):
    root, _ = run_dir
    monkeypatch.chdir(root)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "needs_hub.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "needs_hub",
                "dataset_path": "kd-lightning-tests/no-such-dataset",
                "output_type": "multiple_choice",
                "test_split": "test",
                "doc_to_text": "{{q}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    args = ["lm-eval", "--ckpt", "ckpt/best.ckpt", "--tasks", "needs_hub"]
    with pytest.raises(ConfigError) as info:
        main([*args, "--include-path", str(tasks), "--output", "y.json"])
    err = str(info.value)
    print(err)
    assert "OfflineModeIsEnabled" in err or "ConnectionError" in err
    assert info.value.field == "--tasks" and "needs_hub" in err and "\n" not in err
    assert "local task" in err and "--include-path" in err
    with pytest.raises(ConfigError) as info:  # a missing task folder
        main([*args, "--include-path", str(tmp_path / "nope"), "--output", "y.json"])
    assert info.value.field == "--include-path"


def test_task_data_is_the_quickstart_test_split(run_dir, tmp_path):
    _, dm = run_dir
    n = main(["lm-eval", "--write-task-data", str(tmp_path / "t.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").open()]
    assert n == len(rows) == 386
    pairs = {(r["prompt"], " " + r["completion"]) for r in rows}
    assert set(dm.references["test"]) <= pairs  # the data module's own test prompts
    assert not {p for p, _ in dm.references["train"]} & {p for p, _ in pairs}
    for r in rows:
        assert len(set(r["choices"])) == 4 and r["choices"][r["label"]] == r["completion"]


def test_kd_lightning_and_a_fit_never_import_lm_eval(run_dir):
    root, _ = run_dir
    code = (
        "import sys\n"
        "import kd_lightning, kd_lightning.lm_harness\n"
        "from kd_lightning.cli import build_cli, main\n"
        "main(['--help'])\n"
        "cli = build_cli(['-c', 'kd.yaml'], run=False)  # a fit's objects, built\n"
        "assert type(cli.model).__name__ == 'LMDistillationModule'\n"
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
