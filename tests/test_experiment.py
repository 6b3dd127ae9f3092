"""`kd-lightning experiment`: runs end to end, resumes, and reports numbers that add up."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from kd_lightning.experiment import aggregate, mean_std, parse_spec
from kd_lightning.experiment.plots import reliability_bins
from kd_lightning.experiment.results import markdown_table
from kd_lightning.experiment.runner import Experiment, _run_key
from tests.conftest import CONFIGS

SMOKE = str(CONFIGS / "experiments" / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The smoke experiment (teacher, scratch ×2 seeds, KD ×2 seeds), run once per module."""
    out = tmp_path_factory.mktemp("smoke") / "exp"
    main(["experiment", "--config", SMOKE, f"--output_dir={out}"])
    return out


def _records(out: Path) -> dict[tuple[str, int], dict]:
    return {(d["stage"], d["seed"]): d for d in
            (json.loads(p.read_text()) for p in out.glob("*/seed*/done.json"))}


def test_smoke_outputs_are_consistent(smoke: Path) -> None:
    for name in ("results.csv", "results.json", "results.md", "experiment.yaml"):
        assert (smoke / name).is_file(), name
    data = json.loads((smoke / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["teacher", "scratch", "kd_t4"]
    assert [rows[n]["n_seeds"] for n in rows] == [1, 2, 2]
    records = _records(smoke)
    assert len(records) == 5 and len(data["runs"]) == 5

    # mean ± sample std recomputed from the per-run done.json files
    for name in ("scratch", "kd_t4"):
        for metric in ("test_acc_best", "test_acc_last", "agreement_best", "test_ece_best"):
            values = [records[(name, s)][metric] for s in (0, 1)]
            assert rows[name][f"{metric}_mean"] == pytest.approx(statistics.fmean(values))
            assert rows[name][f"{metric}_std"] == pytest.approx(statistics.stdev(values))
    assert rows["teacher"]["test_acc_best_std"] is None  # one run: no spread to report
    # provenance: the file's own command, commit and config digests reproduce it
    meta = data["meta"]
    assert meta["command"].startswith("kd-lightning experiment")
    assert meta["git_commit"] and meta["resolved_config_sha256"]
    assert "configs/quickstart/kd.yaml" in meta["config_files"]
    for which in ("best", "last"):
        gain = rows["kd_t4"][f"test_acc_{which}_mean"] - rows["scratch"][f"test_acc_{which}_mean"]
        assert rows["kd_t4"][f"gain_{which}"] == pytest.approx(gain)
        assert rows["scratch"][f"gain_{which}"] is None

    # results.csv holds the same numbers as results.json
    with (smoke / "results.csv").open() as fh:
        table = {r["name"]: r for r in csv.DictReader(fh)}
    assert float(table["kd_t4"]["test_acc_best_mean"]) == pytest.approx(rows["kd_t4"]["test_acc_best_mean"])
    assert float(table["kd_t4"]["gain_last"]) == pytest.approx(rows["kd_t4"]["gain_last"])
    assert table["teacher"]["test_acc_best_std"] == ""

    md = (smoke / "results.md").read_text()
    assert "best-val ckpt" in md and "last epoch" in md and "Per-seed" in md
    mean, std = 100 * rows["kd_t4"]["test_acc_best_mean"], 100 * rows["kd_t4"]["test_acc_best_std"]
    assert f"{mean:.2f} ± {std:.2f}" in md

    for png in ("results_bars", "val_curves", "reliability"):
        assert (smoke / "plots" / f"{png}.png").stat().st_size > 5_000


def test_smoke_run_artifacts(smoke: Path) -> None:
    teacher = torch.load(smoke / "teacher" / "seed0" / "test_predictions.pt", weights_only=True)
    for (stage, seed), rec in _records(smoke).items():
        run = smoke / stage / f"seed{seed}"
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in history] == [0, 1]  # the progress callback, one row per epoch
        assert rec["epochs"] == 2 and 1 <= rec["best_epoch"] <= 2
        assert Path(rec["best_ckpt"]).is_file()
        # "last" really is the final weights (2 epochs × 3 batches), whatever epoch was best
        assert torch.load(rec["last_ckpt"], weights_only=False)["global_step"] == 6
        if stage != "teacher":
            assert rec["params"] == 50_890  # the 1×64 MLP student: 784·64+64 + 64·10+10
        assert (run / "logs" / "version_0" / "metrics.csv").is_file()
        # the run's resolved config went to the logger together with the git revision
        assert "git_commit" in (run / "logs" / "version_0" / "hparams.yaml").read_text()
        if stage == "teacher":
            continue
        preds = torch.load(run / "test_predictions.pt", weights_only=True)
        same = (preds["probs_best"].argmax(1) == teacher["probs_best"].argmax(1)).float().mean()
        assert rec["agreement_best"] == pytest.approx(float(same))
        if stage == "kd_t4":
            assert rec["kl_teacher_student_best"] > 0 and rec["teacher_test_acc"] is not None


def test_resume_skips_finished_runs(smoke: Path, capsys) -> None:
    before = _records(smoke)
    (smoke / "kd_t4" / "seed1" / "done.json").unlink()  # as if it crashed mid-run
    (smoke / "kd_t4" / "seed1" / "history.jsonl").write_text('{"epoch": 0, "val/st')  # torn line
    capsys.readouterr()
    main(["experiment", "--config", SMOKE, f"--output_dir={smoke}", "--plots=false"])
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 4
    assert "kd_t4 seed 1: training" in out
    after = _records(smoke)
    for key in before:
        if key != ("kd_t4", 1):
            assert after[key]["seconds"] == before[key]["seconds"]  # untouched
    history = (smoke / "kd_t4" / "seed1" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2  # the crashed run restarted from a clean folder


def test_reused_teacher_checkpoint_and_tensorboard(mnist_teacher_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    rows = main([
        "experiment", "--config", SMOKE, f"--output_dir={out}", "--seeds=[3]",
        # a given checkpoint is only tested: its run needs the data config, not a model config
        f"--teacher.checkpoint={mnist_teacher_ckpt}", "--teacher.configs=[configs/data/bundled_mnist.yaml]",
        f"--logger={CONFIGS / 'logger' / 'tensorboard.yaml'}", "--plots=false",
    ])
    teacher = rows[0]
    assert teacher["name"] == "teacher" and teacher["test_acc_best_mean"] is not None
    assert teacher["test_acc_last_mean"] is None  # a given checkpoint has no "last epoch"
    assert "| teacher | teacher |" in (out / "results.md").read_text()
    kd = json.loads((out / "kd_t4" / "seed3" / "done.json").read_text())
    assert json.dumps({"checkpoint": str(mnist_teacher_ckpt.resolve())}) in " ".join(kd["command"])
    assert list((out / "kd_t4" / "seed3" / "logs").rglob("events.out.tfevents.*"))


def test_bad_experiment_files_fail_before_training(tmp_path: Path) -> None:
    base = ["--config", SMOKE, f"--output_dir={tmp_path / 'x'}"]
    with pytest.raises(ConfigError, match=r"kd\[0\]\.configs\[0\]"):
        parse_spec([*base, '--kd=[{"name": "kd", "configs": ["configs/nope.yaml"]}]'])
    with pytest.raises(ConfigError, match="seeds"):
        parse_spec([*base, "--seeds=[1, 1]"])
    with pytest.raises(ConfigError, match="repeat"):
        parse_spec([*base, '--kd=[{"name": "scratch"}]'])
    with pytest.raises(ConfigError, match="online"):
        Experiment(parse_spec([*base, "--online=true"]))
    # a typo in the last stage is caught by parsing every stage before the teacher trains
    typo = '--kd=[{"name": "kd", "configs": ["configs/quickstart/kd.yaml"], ' \
           '"overrides": {"model": {"init_args": {"studnt": "mlp"}}}}]'
    with pytest.raises(ConfigError, match=r"kd\[0\].*studnt"):
        main(["experiment", *base, typo])
    assert not list((tmp_path / "x").glob("*/seed*/done.json"))


def test_wandb_runs_are_grouped(tmp_path: Path) -> None:
    spec = parse_spec(["--config", SMOKE, f"--output_dir={tmp_path}",
                       f"--logger={CONFIGS / 'logger' / 'wandb.yaml'}", "--online=true"])
    exp = Experiment(spec)
    args = exp._fit_args("kd", spec.kd[0], 1, tmp_path / "kd_t4" / "seed1", teacher_ckpt="t.ckpt")
    assert "--trainer.logger.init_args.group=smoke" in args
    assert "--trainer.logger.init_args.job_type=kd" in args
    assert "--trainer.logger.init_args.offline=false" in args


def test_run_key_follows_config_content(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer: {max_epochs: 1}\n")
    key = _run_key(["fit", "-c", str(cfg)], "")
    cfg.write_text("trainer: {max_epochs: 2}\n")
    assert _run_key(["fit", "-c", str(cfg)], "") != key
    assert _run_key(["fit", "-c", str(cfg)], "teacher-v2") != _run_key(["fit", "-c", str(cfg)], "")


def test_aggregate_and_table_by_hand() -> None:
    runs = [
        {"stage": "t", "seed": 0, "test_acc_best": 0.99, "test_acc_last": 0.98},
        {"stage": "s", "seed": 0, "test_acc_best": 0.90, "test_acc_last": 0.88},
        {"stage": "s", "seed": 1, "test_acc_best": 0.92, "test_acc_last": 0.86},
        {"stage": "k", "seed": 0, "test_acc_best": 0.93, "test_acc_last": 0.93},
        {"stage": "k", "seed": 1, "test_acc_best": 0.95, "test_acc_last": 0.91},
    ]
    rows = aggregate(runs, [("teacher", "t"), ("scratch", "s"), ("kd", "k")])
    s, k = rows[1], rows[2]
    assert s["test_acc_best_mean"] == pytest.approx(0.91)
    assert s["test_acc_best_std"] == pytest.approx(0.0141421356)  # sample std, ddof=1
    assert k["gain_best"] == pytest.approx(0.03) and k["gain_last"] == pytest.approx(0.05)
    md = markdown_table(rows)
    assert "| k | kd | 94.00 ± 1.41 | 92.00 ± 1.41 | +3.00 | +5.00 |" in md
    assert mean_std([None, 0.5]) == (0.5, None)


def test_reliability_bins_match_torchmetrics_ece() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 10, generator=g).mul(3).softmax(1)
    labels = torch.randint(0, 10, (500,), generator=g)
    ours = reliability_bins(probs, labels, n_bins=15)["ece"]
    ref = MulticlassCalibrationError(10, n_bins=15, norm="l1")(probs, labels)
    assert ours == pytest.approx(float(ref), abs=1e-5)


def test_test_predictions_read_text_batches_by_the_models_input_keys():
    """The runner's agreement/plots predictions go through the same batch convention as the
    modules (a text model reads input_ids + attention_mask, not image)."""
    from kd_lightning.experiment.runner import _predict
    from kd_lightning.modules import ClassifierModule

    module = ClassifierModule(model="bag_of_embeddings", num_classes=2, input_shape=(8,),
                              vocab_sizes={"input_ids": 30})
    ids = torch.randint(1, 30, (5, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": torch.tensor([0, 1, 0, 1, 1])}

    class Data:
        def test_dataloader(self):
            return [batch, batch]

    probs, labels = _predict(module, Data())
    assert probs.shape == (10, 2) and torch.allclose(probs.sum(1), torch.ones(10))
    expected = module(ids, torch.ones_like(ids)).softmax(1)
    torch.testing.assert_close(probs[:5], expected.detach())
    assert labels.tolist() == batch["label"].tolist() * 2


def test_changed_finished_run_is_not_overwritten_without_flag(smoke: Path, capsys) -> None:
    before = (smoke / "teacher" / "seed0" / "done.json").read_text()
    with pytest.raises(ConfigError, match="--overwrite true"):
        # other arguments make every finished run stale: the teacher's is refused first
        main(["experiment", "--config", SMOKE, f"--output_dir={smoke}", "--plots=false",
              "--args=[--trainer.max_epochs=1]"])
    assert (smoke / "teacher" / "seed0" / "done.json").read_text() == before


def test_run_progress_counts_runs_and_estimates_time() -> None:
    from kd_lightning.experiment.runner import _RunProgress

    p = _RunProgress(5)
    assert str(p) == "(0/5 runs done, ETA —)"
    p.done(None)  # a skipped run takes no time
    p.done(10.0)
    p.done(20.0)
    assert p.eta_seconds() == pytest.approx(2 * 15.0)
    assert str(p) == "(3/5 runs done, ETA 00:00:30)"


@pytest.mark.slow
def test_wandb_experiment_runs_offline_for_real(tmp_path: Path, monkeypatch, capsys) -> None:
    """The real W&B path: every run ends its wandb run (wandb ≥ 0.31's finish() has no
    ``quiet``; it crashed the second run) and writes an offline run in its own folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    out = tmp_path / "exp"
    rows = main(["experiment", "--config", SMOKE, f"--output_dir={out}", "--seeds=[0]",
                 f"--logger={CONFIGS / 'logger' / 'wandb.yaml'}", "--plots=false",
                 "--args=[--trainer.max_epochs=1]"])
    assert [r["name"] for r in rows] == ["teacher", "scratch", "kd_t4"]
    for stage in ("teacher", "scratch", "kd_t4"):
        runs = list((out / stage / "seed0" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, stage
        assert json.loads((out / stage / "seed0" / "done.json").read_text())["test_acc_last"] > 0
    assert "3/3 runs done" in capsys.readouterr().out


def test_grid_expands_kd_stages_and_seeds(tmp_path: Path) -> None:
    grid = str(CONFIGS / "experiments" / "grid_smoke.yaml")
    spec = parse_spec(["--config", grid, f"--output_dir={tmp_path}"])
    assert spec.seeds == [0, 1]
    assert [s.name for s in spec.kd] == ["kd-lr=0.002", "kd-lr=0.004"]
    lrs = [s.overrides["model"]["init_args"]["optimizer"]["init_args"]["lr"] for s in spec.kd]
    assert lrs == [0.002, 0.004]
    # the value reaches the run as the stage's overrides file, and the CLI accepts it
    exp = Experiment(spec)
    args = exp._fit_args("kd", spec.kd[1], 0, tmp_path / "kd-lr=0.004" / "seed0", "t.ckpt")
    fragment = tmp_path / "kd-lr=0.004" / "overrides.yaml"
    assert str(fragment) in args and "lr: 0.004" in fragment.read_text()
    exp._preflight()  # every expanded stage parses as a `kd-lightning fit`
    with pytest.raises(ConfigError, match=r"grid\.model\.x"):
        parse_spec(["--config", grid, "--grid={model.x: []}"])


def test_committed_smoke_result_reproduces_with_its_own_command(smoke: Path) -> None:
    """docs/results/smoke.json came from the command it records; that command, run on this code
    (the fixture runs it, with only the output folder moved), gives the same rows."""
    from kd_lightning.provenance import stale_configs
    from tests.conftest import REPO

    ref = json.loads((REPO / "docs" / "results" / "smoke.json").read_text())
    meta = ref["meta"]
    assert meta["command"] == "kd-lightning experiment -c configs/experiments/smoke.yaml"
    assert not meta["git_dirty"] and len(meta["git_commit"]) == 40
    assert stale_configs(meta) == [], "the smoke configs changed: rerun the command, commit the file"
    got = {r["name"]: r for r in json.loads((smoke / "results.json").read_text())["rows"]}
    assert set(got) == {r["name"] for r in ref["rows"]}
    for row in ref["rows"]:
        for key in ("test_acc_best_mean", "test_acc_last_mean", "agreement_best_mean"):
            if row.get(key) is None:
                continue
            # 250 test digits: allow one image of float drift between CPU models, no more
            assert got[row["name"]][key] == pytest.approx(row[key], abs=1 / 250 + 1e-6), (row["name"], key)
