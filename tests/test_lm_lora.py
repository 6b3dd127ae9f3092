"""LoRA students (peft): only the adapters train, are optimised and are checkpointed."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm import TokenDivergence
from kd_lightning.models.lm import LoRASpec
from kd_lightning.modules.lm_distillation import LMDistillationModule
from kd_lightning.modules.teacher import TeacherSpec
from tests.test_lm_module import TINY, V, _split, _window

pytest.importorskip("peft", reason="LoRA students need peft (the llm extra, in dev)")

LORA = LoRASpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def _module(seed=0, lora=LORA, chunk_size=0):
    torch.manual_seed(seed)
    return LMDistillationModule(
        "llama",
        TINY,
        TeacherSpec(model="llama", model_kwargs=TINY, allow_untrained=True),
        heads=[TokenDivergence(1.0, "forward_kl")],
        num_classes=V,
        generate_samples=0,
        chunk_size=chunk_size,
        lora=lora,
    )


def _fit(module, root, steps, ckpt_path=None):
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, monitor=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[checkpoint],
        default_root_dir=root,
    )
    data = DataLoader(_split(_window(), 4), batch_size=None)
    trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path, weights_only=False)
    return trainer


def test_lora_student_trains_and_checkpoints_only_its_adapters(tmp_path):
    module = _module(chunk_size=8)  # the chunked loss reaches the backbone under peft too
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    base_before = {n: p.clone() for n, p in module.student.named_parameters() if "lora_" not in n}
    trainer = _fit(module, tmp_path, steps=2)
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.parameters() if p.requires_grad}
    for n, p in module.student.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n  # the base never moves
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    keys = set(saved["state_dict"])
    assert keys and all(".lora_" in k for k in keys), sorted(keys)[:5]
    assert keys == {f"{n}" for n in trainable}
    assert not any(k.startswith("teacher") for k in keys)

    # resume: the same base (same seed) takes the adapters and the optimizer state back
    again = _module()
    _fit(again, tmp_path / "resumed", steps=3, ckpt_path=str(tmp_path / "last.ckpt"))
    fresh = _module()
    fresh.on_load_checkpoint(saved)
    fresh.load_state_dict(saved["state_dict"], strict=False)
    for k, v in saved["state_dict"].items():
        torch.testing.assert_close(fresh.state_dict()[k], v)

    # adapters of another base are refused in one line
    with pytest.raises(ConfigError, match="other base weights"):
        _module(seed=1).on_load_checkpoint(saved)
    with pytest.raises(ConfigError, match="model.lora"):
        _module(lora=None).on_load_checkpoint(saved)


def test_lora_target_modules_are_checked():
    with pytest.raises(ConfigError, match="target_modules"):
        _module(lora=LoRASpec(target_modules=["c_attn"]))
