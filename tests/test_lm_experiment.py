"""The LLM quickstart experiment runs through ``kd-lightning experiment`` (debug-sized)."""

from __future__ import annotations

import json
import statistics

import pytest

from kd_lightning.cli import main
from tests.conftest import CONFIGS


@pytest.mark.slow
def test_llm_quickstart_experiment_reports_lm_metrics_over_seeds(tmp_path):
    out = tmp_path / "exp"
    tiny = {
        "data": {
            "init_args": {
                "data_dir": str(tmp_path / "data"),
                "vocab_size": 320,
                "max_train_examples": 16,
                "max_eval_examples": 8,
            }
        },
        "model": {"init_args": {"generate_samples": 2, "max_new_tokens": 4}},
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 1,
            "limit_val_batches": 1,
            "limit_test_batches": 1,
        },
    }
    main(
        [
            "experiment",
            "--config",
            str(CONFIGS / "experiments" / "llm_quickstart.yaml"),
            f"--output_dir={out}",
            "--seeds=[0, 1]",
            f"--overrides={json.dumps(tiny)}",
        ]
    )
    data = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["teacher", "scratch", "kd_jsd"]
    runs = {(r["stage"], r["seed"]): r for r in data["runs"]}
    for name in ("scratch", "kd_jsd"):
        values = [runs[(name, s)]["test_nll_best"] for s in (0, 1)]
        assert rows[name]["test_nll_best_mean"] == pytest.approx(statistics.fmean(values))
        assert rows[name]["test_nll_best_std"] == pytest.approx(statistics.stdev(values))
        assert rows[name]["test_rougeL_best_mean"] is not None
    # the distilled rows carry KL against the teacher; the baseline has no teacher to compare
    assert rows["kd_jsd"]["test_kl_best_mean"] >= 0 and rows["scratch"]["test_kl_best_mean"] is None
    md = (out / "results.md").read_text()
    assert "NLL (nats/token)" in md and "ROUGE-L" in md
    mean, std = rows["kd_jsd"]["test_nll_best_mean"], rows["kd_jsd"]["test_nll_best_std"]
    assert f"{mean:.3f} ± {std:.3f}" in md
