"""Sequence-level KD: the teacher's completions are generated once, stored, reused by key."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm import TokenCrossEntropy
from kd_lightning.modules.lm_distillation import LMDistillationModule, SequenceKDSpec
from kd_lightning.modules.teacher import TeacherSpec
from tests.test_lm_module import TINY, _trainer, lm_data  # noqa: F401 (the fixture)


def _fit(dm, tmp_path, spec):
    torch.manual_seed(0)  # the same (random, allowed) teacher every time: the same fingerprint
    module = LMDistillationModule(
        "llama",
        TINY,
        TeacherSpec(model="llama", model_kwargs=TINY, allow_untrained=True),
        heads=[TokenCrossEntropy(1.0)],  # sequence-level KD: CE on the teacher's completions
        num_classes=dm.num_classes,
        generate_samples=0,
        sequence_kd=spec,
    )
    dm.splits = {}  # the dataset's own completions again (setup re-reads its cache)
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, dm)
    return module


def test_teacher_generations_are_stored_once_reused_and_refused_on_another_key(lm_data, tmp_path):  # noqa: F811
    dm, _ = lm_data
    path = tmp_path / "gen" / "teacher.pt"
    spec = SequenceKDSpec(str(path), temperature=1.0, max_new_tokens=5, seed=1)
    _fit(dm, tmp_path, spec)
    stored = torch.load(path, weights_only=True)
    train = dm.splits["train"]
    assert len(stored["completions"]) == len(train) and stored["settings"]["seed"] == 1
    for row, completion in zip(train, stored["completions"]):  # the data now reads them
        assert 1 <= len(completion) <= 5
        assert row["input_ids"][row["prompt_len"] :] == completion[: 64 - row["prompt_len"]]
    mtime = path.stat().st_mtime_ns

    _fit(dm, tmp_path, spec)  # the same key: reused, not regenerated
    assert path.stat().st_mtime_ns == mtime

    other = SequenceKDSpec(str(path), temperature=0.7, max_new_tokens=5, seed=1)
    with pytest.raises(ConfigError, match="model.sequence_kd.path"):
        _fit(dm, tmp_path, other)
    other.regenerate = True
    _fit(dm, tmp_path, other)
    again = torch.load(path, weights_only=True)
    assert again["key"] != stored["key"] and again["settings"]["temperature"] == 0.7
