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
