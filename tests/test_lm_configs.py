"""The LLM quickstart and the real-pair recipes parse offline, and say what they run."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from kd_lightning.cli import main

LLM = Path(__file__).resolve().parents[1] / "configs" / "llm"
CONFIGS = sorted(LLM.glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(LLM)) for p in CONFIGS])
def test_llm_config_parses_offline(path: Path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"].startswith("kd_lightning.modules.lm_distillation.")
    assert printed["checkpoint"]["mode"] == "min"  # the monitor is val/nll
    header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    if "recipes" in path.parts:  # every setting is cited to the authors' repository@commit
        assert "@" in header and (".sh" in header or ".py" in header)


def test_quickstart_student_is_the_same_in_kd_and_scratch():
    kd = yaml.safe_load((LLM / "quickstart" / "kd.yaml").read_text())
    scratch = yaml.safe_load((LLM / "quickstart" / "scratch.yaml").read_text())
    assert (
        kd["model"]["init_args"]["student_kwargs"] == scratch["model"]["init_args"]["model_kwargs"]
    )
    assert (
        kd["data"] == scratch["data"]
        and kd["trainer"]["max_epochs"] == scratch["trainer"]["max_epochs"]
    )
