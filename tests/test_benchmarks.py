"""The benchmark scripts still run end to end on tiny sizes and print every target row.

No timing is asserted (benchmarks are not tests); this only keeps the scripts, which are the
evidence behind the README's Performance section, from rotting. The ratios they print here
must be finite and positive, nothing more.
"""

from __future__ import annotations

import importlib
import math
import re
import sys

import pytest

RUNS = {
    "overhead": (["--pairs", "mnist", "--steps", "3", "--warmup", "1", "--repeats", "1"],
                 ["(a) lightning KD / hand KD", "minimal LightningModule / hand KD", "(b) KD step"]),
    "cached_teacher": (["--pairs", "mnist", "--images", "256", "--epochs", "1", "--repeats", "1"],
                       ["(c) cached-teacher KD epoch / scratch epoch"]),
    "data_path": (["--images", "256", "--batch", "64", "--repeats", "1", "--workers", "0"],
                  ["(d) tensor path / PIL path"]),
    "gpu_throughput": (["--accelerator", "cpu", "--batch", "4", "--steps", "2", "--warmup", "1",
                        "--repeats", "1", "--workers", "0", "--modes", "resident", "--skip-compile"],
                       ["KD fp32", "teacher cache", "scratch student"]),
}


@pytest.mark.parametrize("script", list(RUNS))
def test_benchmark_script_runs_and_reports(script, monkeypatch, capsys):
    args, rows = RUNS[script]
    monkeypatch.setattr(sys, "argv", [script, *args])
    importlib.import_module(f"benchmarks.{script}").main()
    out = capsys.readouterr().out
    for row in rows:
        (line,) = [line for line in out.splitlines() if row in line]
        numbers = [float(v.replace(",", "")) for v in re.findall(r"(?<![\w.])\d[\d,]*\.?\d*", line.split(":", 1)[1])]
        assert numbers and all(math.isfinite(v) and v > 0 for v in numbers), line


#: the ImageNet-scale benchmarks at toy sizes: a result JSON with the machine and every field
JSON_RUNS = {
    "teacher_store": (["--teacher", "tv:resnet18", "--num-classes", "10", "--image-size", "32",
                       "--batch", "2", "--ks", "2", "5", "--kl-images", "4", "--store-samples", "64",
                       "--repeats", "1"], "per_k"),
    "imagenet_step": (["--batch", "2", "--steps", "1", "--warmup", "1", "--k", "5"], "runs"),
    "speed_defaults": (["--batch", "4", "--steps", "1", "--rounds", "1", "--settings", "off",
                        "both_channels_last", "control_perturbed"], "settings"),  # compile: minutes on a CPU
}


@pytest.mark.parametrize("script", list(JSON_RUNS))
def test_json_benchmark_writes_its_result_file(script, monkeypatch, tmp_path):
    import json

    args, key = JSON_RUNS[script]
    out = tmp_path / f"{script}.json"
    monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(out)])
    importlib.import_module(f"benchmarks.{script}").main()
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_model"] and result["machine"]["nproc"] >= 1
    assert result[key]
    if script == "speed_defaults":  # the same-math check is against a true fp64 twin of step 0
        off = result["settings"]["off"]
        assert 0 < off["step0_loss_rel_err_vs_fp64"] < 1e-5
        assert 0 < off["step0_grad_rel_err_vs_fp64"] < 1e-3
