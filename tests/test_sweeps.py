"""Sweeps: grids over any key, the local / submitit launchers, the Optuna search, W&B export."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from kd_lightning.experiment import parse_spec
from tests.conftest import CONFIGS

ROOT = CONFIGS.parent
#: debug-sized runs (as configs/experiments/smoke.yaml): 1 epoch of 2 batches, 250 val/test digits
TINY = {
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
    },
    "data": {"init_args": {"val_fraction": 0.05, "test_fraction": 0.05, "eval_batch_size": 250}},
}
TEMPERATURE = "model.init_args.heads.1.init_args.temperature"


def _spec(tmp: Path, name: str, **fields) -> Path:
    data = {
        "name": name,
        "plots": False,
        "output_dir": str(tmp / name),
        "overrides": TINY,
        "teacher": {"configs": [str(CONFIGS / "quickstart" / "teacher.yaml")]},
        "kd": [{"name": "kd", "configs": [str(CONFIGS / "quickstart" / "kd.yaml")]}],
        **fields,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_grid_over_list_entries_and_scratch_keeps_names(tmp_path: Path) -> None:
    lr = "model.init_args.optimizer.init_args.lr"
    path = _spec(
        tmp_path,
        "g",
        grid={"seeds": [3, 4], lr: [0.001, 0.004]},
        grid_stages=["scratch", "kd"],
        scratch={"name": "scratch", "configs": [str(CONFIGS / "quickstart" / "scratch.yaml")]},
    )
    spec = parse_spec(["-c", str(path)])
    names = [s.name for _, s in spec.stages()]
    assert names == [
        "teacher",
        "scratch-lr=0.001",
        "scratch-lr=0.004",
        "kd-lr=0.001",
        "kd-lr=0.004",
    ]
    assert [s.name for _, s in parse_spec(["-c", str(path)]).stages()] == names  # stable names
    assert spec.seeds == [3, 4]
    assert (
        spec.scratch_grid[1].overrides["model"]["init_args"]["optimizer"]["init_args"]["lr"]
        == 0.004
    )

    spec = parse_spec(["-c", str(_spec(tmp_path, "t", grid={TEMPERATURE: [2.0, 8.0]}))])
    kd = [s for k, s in spec.stages() if k == "kd"]
    assert [s.name for s in kd] == ["kd-temperature=2.0", "kd-temperature=8.0"]
    heads = kd[1].overrides["model"]["init_args"]["heads"]
    # the whole list, from configs/quickstart/kd.yaml, with only the KL temperature changed
    assert heads[0] == {
        "class_path": "kd_lightning.losses.CrossEntropy",
        "init_args": {"weight": 0.1},
    }
    assert heads[1]["init_args"] == {"weight": 0.9, "temperature": 8.0}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"launcher": "kubernetes"}, "launcher"),
        ({"launcher": "local", "parallel": 0}, "parallel"),
        ({"launcher": "submitit_local", "slurm": {"partitionn": "gpu"}}, "slurm.partitionn"),
        ({"grid_stages": ["teacher"]}, "grid_stages"),
        (
            {"grid": {"model.init_args.heads.5.init_args.temperature": [2.0]}},
            "grid.model.init_args.heads.5.init_args.temperature",
        ),
        (
            {
                "search": {
                    "n_trials": 2,
                    "parameters": {
                        "model.init_args.optimizer.init_args.lr": {
                            "type": "lognormal",
                            "low": 1,
                            "high": 2,
                        }
                    },
                }
            },
            "search.parameters.model.init_args.optimizer.init_args.lr.type",
        ),
        (
            {
                "search": {
                    "n_trials": 2,
                    "parameters": {
                        "model.init_args.optimizer.init_args.lr": {
                            "type": "float",
                            "low": 0.1,
                            "high": 0.01,
                        }
                    },
                }
            },
            "search.parameters.model.init_args.optimizer.init_args.lr.low",
        ),
        (
            {"search": {"n_trials": 2, "stage": "nope", "parameters": {"trainer.max_epochs": [1]}}},
            "search.stage",
        ),
        (
            {
                "search": {
                    "n_trials": 2,
                    "pruner": "sometimes",
                    "parameters": {"trainer.max_epochs": [1]},
                }
            },
            "search.pruner.name",
        ),
    ],
)
def test_bad_sweep_input_is_one_line_naming_the_field(
    tmp_path: Path, fields: dict, field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_spec(["-c", str(_spec(tmp_path, "bad", **fields))])
    assert err.value.field == field and "\n" not in str(err.value)


def test_wandb_sweep_export_parses_with_wandb_and_our_cli(tmp_path: Path, monkeypatch) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

    from kd_lightning.experiment.wandb_sweep import SWEEP_KEYS

    monkeypatch.chdir(ROOT)  # the command's paths are relative to where it was exported
    spec = _spec(tmp_path, "w", grid={"seeds": [0, 1], TEMPERATURE: [2.0, 4.0]})
    out = tmp_path / "sweep.yaml"
    main(["experiment", "-c", str(spec), "--export-wandb-sweep", str(out)])
    sweep = load_sweep_config(str(out))  # wandb's own loader (no offline schema validator ships)
    assert set(sweep) <= set(SWEEP_KEYS) and sweep["method"] == "grid" and sweep["program"]
    params = sweep["parameters"]
    assert params["seed_everything"] == {"values": [0, 1]}
    assert len(params["model.init_args.heads"]["values"]) == 2
    assert sweep["command"][-1] == "${args}"
    # the agent's substitution (wandb_agent.Agent._command_run), then our fit parses the result
    values = {
        "seed_everything": 1,
        "model.init_args.heads": params["model.init_args.heads"]["values"][1],
    }
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    command = []
    for c in sweep["command"]:
        command += (
            flags[c[2:-1]]
            if c.startswith("${") and c != "${env}"
            else ([] if c == "${env}" else [c])
        )
    assert command[:2] == ["kd-lightning", "fit"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as done:
        main([*command[1:], "--print_config"])
    assert done.value.code in (0, None)
    resolved = yaml.safe_load(buf.getvalue())
    assert resolved["seed_everything"] == 1
    assert resolved["model"]["init_args"]["heads"][1]["init_args"]["temperature"] == 4.0
    assert resolved["trainer"]["limit_train_batches"] == 2  # the experiment's overrides came along


def _table(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [
        {k: v for k, v in r.items() if k.endswith(("_mean", "_std")) or k in ("name", "n_seeds")}
        for r in rows
    ]


@pytest.mark.slow
def test_grid_gives_the_same_table_on_local_and_submitit(tmp_path: Path) -> None:
    """Done-when (issue 22): 2 temperatures × 2 seeds through `local` (2 at once) and through
    submitit's LocalExecutor (real jobs in subprocesses): identical tables."""
    grid = {"seeds": [0, 1], TEMPERATURE: [2.0, 4.0]}
    local = _spec(tmp_path, "local", grid=grid, launcher="local", parallel=2)
    sub = _spec(
        tmp_path,
        "sub",
        grid=grid,
        launcher="submitit_local",
        parallel=2,
        runs_per_job=4,  # the 4 KD runs share one job: one torch import (~10 CPU-s here)
        slurm={"timeout_min": 10},
    )
    main(["experiment", "-c", str(local)])
    main(["experiment", "-c", str(sub)])
    a, b = _table(tmp_path / "local"), _table(tmp_path / "sub")
    assert [r["name"] for r in a] == ["teacher", "kd-temperature=2.0", "kd-temperature=4.0"]
    assert a == b  # deterministic runs: the same numbers, whichever launcher ran them
    assert [r["n_seeds"] for r in a] == [1, 2, 2]
    run = tmp_path / "local" / "kd-temperature=4.0" / "seed1"
    assert "epoch 1/1" in (run / "run.log").read_text()  # each run logs to its own folder
    assert (tmp_path / "sub" / "submitit").is_dir()  # submitit's own job files
    # a second pass skips every finished run, on any launcher
    main(["experiment", "-c", str(sub)])
    assert _table(tmp_path / "sub") == b


def _running_has_params(db: Path) -> bool:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            query = ("select count(*) from trial_params join trials using (trial_id)"
                     " where trials.state = 'RUNNING'")
            return con.execute(query).fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False


def _states(db: Path) -> list[str]:
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return [s for (s,) in con.execute("select state from trials order by number")]
    except sqlite3.OperationalError:  # the table is not created yet, or the file is locked
        return []


@pytest.mark.slow
def test_search_resumes_after_kill(tmp_path: Path) -> None:
    """Done-when (issue 22): kill -9 a search after its first trial; the rerun keeps the
    finished trial, retries the cut-short one and reaches n_trials."""
    search = {
        "n_trials": 3,
        "sampler": {"name": "random", "seed": 0},
        "pruner": "none",
        "parameters": {
            "model.init_args.optimizer.init_args.lr": {
                "type": "float",
                "low": 1e-3,
                "high": 1e-2,
                "log": True,
            }
        },
    }
    path = _spec(tmp_path, "s", search=search)
    db = tmp_path / "s" / "search.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kd_lightning", "experiment", "-c", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            # kill once the second trial has sampled (a trial killed before it sampled is
            # failed and replaced, not retried: test_search_replaces_a_trial_cut_before_sampling)
            if "COMPLETE" in _states(db) and _running_has_params(db):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the search ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _states(db)
    assert before[0] == "COMPLETE" and before[-1] == "RUNNING"
    import optuna

    first = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials[0]
    main(["experiment", "-c", str(path)])
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials
    assert trials[0].value == first.value and trials[0].params == first.params  # kept, not rerun
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1  # the cut-short one
    cut = trials[len(before) - 1]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == cut.number)
    assert retry.params == cut.params and retry.state.name == "COMPLETE"
    md = (tmp_path / "s" / "results.md").read_text()
    assert "### Search over `kd`" in md and "Best: trial" in md


def test_search_replaces_a_trial_cut_before_sampling(tmp_path: Path) -> None:
    """A trial killed between its creation and its first suggest has no parameters: it is
    failed and the sampler draws a fresh trial, none queued as its retry."""
    import optuna

    (tmp_path / "q").mkdir()
    optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'q' / 'search.db'}", study_name="q", direction="maximize"
    ).ask()  # RUNNING, no parameters: what a kill right after the trial's creation leaves
    path = _spec(tmp_path, "q", search={"n_trials": 1, "parameters": {TEMPERATURE: [4.0]}})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["experiment", "-c", str(path)])
    assert "trial 0 was cut short; it had not sampled yet" in out.getvalue()
    trials = optuna.load_study(study_name="q", storage=f"sqlite:///{tmp_path / 'q' / 'search.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == {TEMPERATURE: 4.0} and "retry_of" not in trials[1].user_attrs


@pytest.mark.slow  # 3 fits in-process (~27 s wall on the shared 2 cores)
def test_pruned_trial_is_listed_as_pruned(tmp_path: Path) -> None:
    # val/acc is at most 1, so a threshold of 1.01 prunes the trial at its first report
    search = {
        "n_trials": 1,
        "pruner": {"name": "threshold", "lower": 1.01},
        "parameters": {TEMPERATURE: [4.0]},
    }
    path = _spec(
        tmp_path,
        "p",
        search=search,
        overrides={**TINY, "trainer": {**TINY["trainer"], "max_epochs": 2}},
    )
    main(["experiment", "-c", str(path)])
    summary = json.loads((tmp_path / "p" / "search.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["PRUNED"]
    assert list(summary["trials"][0]["intermediate"]) == ["0"]  # stopped after epoch 1 of 2
    assert "| 0 | pruned |" in (tmp_path / "p" / "results.md").read_text()


def test_shipped_sweep_specs_parse() -> None:
    for name in ("sweep_temperature", "search_kd"):
        spec = parse_spec(["-c", str(CONFIGS / "experiments" / f"{name}.yaml")])
        assert spec.kd
    from kd_lightning.experiment.search import parse_search

    assert parse_search(spec).n_trials == 16


def test_slurm_parameters_and_a_missing_sbatch(tmp_path: Path, monkeypatch) -> None:
    from kd_lightning.experiment.launch import make_launcher, slurm_parameters

    # submitit's own names stay; Slurm's get the slurm_ prefix AutoExecutor expects
    assert slurm_parameters({"partition": "gpu", "timeout_min": 30, "gpus_per_node": 1}) == {
        "slurm_partition": "gpu",
        "timeout_min": 30,
        "gpus_per_node": 1,
    }
    spec = parse_spec(["-c", str(_spec(tmp_path, "sl", launcher="slurm", slurm={"qos": "low"}))])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ConfigError) as err:
        make_launcher(spec, tmp_path)
    assert err.value.field == "launcher" and "submitit_local" in str(err.value)
