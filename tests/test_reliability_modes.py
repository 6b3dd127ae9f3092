"""Issue 21: a fit trains in the right mode and never distils from a random teacher silently.

* finding 2: ``hf:`` models come back from ``from_pretrained`` in eval mode; a fine-tuned one
  must train with dropout on;
* train mode at fit start: every trainable submodule trains, every frozen teacher is in eval
  mode, whatever mode they were loaded in;
* finding 4: a teacher with no trained weights is refused unless ``allow_untrained``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.modules.teacher import TeacherSpec, build_teacher, refuse_untrained
from tests.test_text_models import _save_tiny_bert


class Digits(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {
            "image": torch.randn(1, 28, 28, generator=g),
            "label": torch.tensor(i % 10),
            "index": torch.tensor(i),
        }


class Modes(L.Callback):
    """Record every submodule's mode when the first training batch runs."""

    def on_train_batch_start(self, trainer, module, *args) -> None:
        if not hasattr(self, "student"):
            self.student = {n: m.training for n, m in module.named_modules()}
            self.teachers = [
                [m.training for m in t.modules()] for t in getattr(module, "_teachers", [])
            ]


def _fit(module: L.LightningModule) -> Modes:
    modes = Modes()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[modes],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(Digits(), batch_size=4))
    return modes


def test_pretrained_hf_model_is_built_in_train_mode(tmp_path):
    """Before the fix every submodule of ``hf:`` came back in eval mode (dropout off)."""
    model = create_model(
        f"hf:{_save_tiny_bert(tmp_path / 'bert')}", 2, None, vocab_size=40, max_length=32
    )
    assert all(m.training for m in model.modules())
    # as a teacher it is frozen: eval mode
    teacher = build_teacher(
        TeacherSpec(model=f"hf:{tmp_path / 'bert'}"),
        2,
        {"vocab_size": 40, "max_length": 32},
        "model.teacher",
    )
    assert not any(m.training for m in teacher.modules()) and teacher.kd_untrained is None


def test_a_student_loaded_in_eval_mode_trains_in_train_mode():
    module = ClassifierModule(model="lenet5", num_classes=10, input_shape=(1, 28, 28))
    module.eval()  # as from_pretrained or load_from_checkpoint().eval() leave it
    with pytest.warns(
        UserWarning, match=r"trainable module\(s\) were in eval mode.*switched to train"
    ):
        modes = _fit(module)
    assert all(modes.student.values())


def test_a_teacher_put_in_train_mode_is_frozen_again():
    module = DistillationModule(
        student="lenet5",
        num_classes=10,
        input_shape=(1, 28, 28),
        teacher=TeacherSpec(model="lenet5", allow_untrained=True),
    )
    torch.nn.Module.train(module.teacher, True)  # bypasses freeze()'s guard
    with pytest.warns(UserWarning, match=r"frozen teacher\(s\) \[0\] were in train mode"):
        modes = _fit(module)
    assert modes.teachers == [[False] * len(modes.teachers[0])]
    assert all(v for n, v in modes.student.items())


def test_an_untrained_teacher_is_refused_at_fit_unless_allowed():
    module = DistillationModule(
        student="lenet5",
        num_classes=10,
        input_shape=(1, 28, 28),
        teacher=TeacherSpec(model="lenet5"),
    )
    with pytest.raises(
        ConfigError, match=r"^model\.teacher\.model='lenet5' is invalid.*allow_untrained"
    ):
        _fit(module)
    # tv: models are untrained unless model_kwargs.weights names torchvision's weights
    tv = build_teacher(TeacherSpec(model="tv:resnet18"), 10, 3, "model.teacher[1]")
    with pytest.raises(ConfigError, match=r"model\.teacher\[1\]\.allow_untrained: true"):
        refuse_untrained(tv)
    allowed = build_teacher(TeacherSpec(model="tv:resnet18", allow_untrained=True), 10, 3, "t")
    refuse_untrained(allowed)
    assert allowed.kd_untrained is None
