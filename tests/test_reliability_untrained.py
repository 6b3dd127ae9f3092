"""Issue 21, "untrained teachers are visible": the LM path refuses a random teacher decoder at
fit start, as the image path does (``modules.teacher.mark_untrained`` / ``refuse_untrained``).

A built-in ``llama``/``gpt2`` teacher is randomly initialised; before, an LM KD fit distilled
from it without a word.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning.errors import ConfigError
from kd_lightning.models.lm import build_causal_lm
from kd_lightning.modules.lm_distillation import LMDistillationModule
from kd_lightning.modules.teacher import TeacherSpec

V = 32
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2}


def _batches() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    return DataLoader([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}],
                      batch_size=None)


def _kd(spec: TeacherSpec) -> LMDistillationModule:
    return LMDistillationModule("llama", TINY, spec, num_classes=V, generate_samples=0)


def _fit(module: LMDistillationModule, tmp_path) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=_batches())
    return trainer


def test_an_untrained_lm_teacher_is_refused_at_fit_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.teacher\.model='llama'.*no trained weights.*"
                                          r"model\.teacher\.allow_untrained: true"):
        _fit(_kd(TeacherSpec(model="llama", model_kwargs=TINY)), tmp_path)
    allowed = _kd(TeacherSpec(model="llama", model_kwargs=TINY, allow_untrained=True))
    assert _fit(allowed, tmp_path).global_step == 1


def test_lm_teachers_with_weights_are_not_marked(tmp_path):
    decoder = build_causal_lm("llama", V, TINY)
    torch.save(decoder.state_dict(), tmp_path / "teacher.pt")
    weighted = _kd(TeacherSpec(model="llama", model_kwargs=TINY, weights=str(tmp_path / "teacher.pt")))
    assert weighted.teacher.kd_untrained is None
    decoder.save_pretrained(tmp_path / "hf")  # from_pretrained loads trained weights
    assert _kd(TeacherSpec(model=f"hf:{tmp_path / 'hf'}")).teacher.kd_untrained is None


def test_switching_the_cli_teacher_to_an_untrained_model_is_refused_in_one_line(tmp_path, monkeypatch):
    # a new user's way from the quickstart's checkpoint teacher to a named model: before,
    # `checkpoint=null` reached the module as the string 'None' (a missing file "None")
    from kd_lightning.cli import main
    from tests.conftest import CONFIGS, DEBUG_TRAINER

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        main(["fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), *DEBUG_TRAINER,
              "--model.teacher.checkpoint=null", "--model.teacher.model=lenet5"])
    assert info.value.field == "model.teacher.model" and "allow_untrained: true" in str(info.value)
    assert "\n" not in str(info.value)
