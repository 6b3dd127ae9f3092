"""The DistillationModule's contract: a frozen teacher that stays out of training and
checkpoints, and a KD loss that matches Hinton et al.'s formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from kd_lightning.losses import CrossEntropy, KLDivergence, ModelOutput, TeacherOutput
from kd_lightning.modules import DistillationModule, TeacherSpec
from kd_lightning.modules.teacher import build_teacher
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


def reference_kd(student_logits, teacher_logits, t):
    """Hinton KD written out by hand: T² · mean_i Σ_c p_t log(p_t / p_s)."""
    total = 0.0
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        zs = [v / t for v in s_row]
        zt = [v / t for v in t_row]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        p_t = [math.exp(v - lt) for v in zt]
        total += sum(p * ((a - lt) - (b - ls)) for p, a, b in zip(p_t, zt, zs))
    return t * t * total / len(student_logits)


@pytest.mark.parametrize("t", [1.0, 4.0, 20.0])
def test_kd_loss_matches_reference(t):
    gen = torch.Generator().manual_seed(0)
    s, te = torch.randn(6, 10, generator=gen) * 3, torch.randn(6, 10, generator=gen) * 3
    batch = {"label": torch.arange(6)}
    got = KLDivergence(temperature=t)(ModelOutput(s), TeacherOutput([ModelOutput(te)]), batch)
    assert got.item() == pytest.approx(reference_kd(s, te, t), rel=1e-5)
    same = KLDivergence(temperature=t)(ModelOutput(te), TeacherOutput([ModelOutput(te)]), batch)
    assert same.item() == pytest.approx(0.0, abs=1e-5)


def test_ce_head_ignores_unlabelled_samples():
    logits = torch.randn(4, 10)
    labels = torch.tensor([1, -1, 3, -1])
    got = CrossEntropy()(ModelOutput(logits), TeacherOutput([ModelOutput(logits)]), {"label": labels})
    want = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_nonpositive_temperature_is_rejected(bad):
    with pytest.raises(ConfigError, match="temperature"):
        KLDivergence(temperature=bad)


def test_teacher_is_frozen_outside_optimizer_and_state_dict(mnist_teacher_ckpt):
    module = DistillationModule(teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)))
    teacher = module.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith(("_teachers", "teacher")) for k in module.state_dict())
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in module.parameters()}
    module.train()  # Lightning calls this after every validation loop
    teacher.train()  # even a direct call cannot flip a frozen teacher
    assert not teacher.training
    module.to(torch.float64)  # dtype/device moves still reach the teacher
    assert next(teacher.parameters()).dtype == torch.float64


def test_kd_fit_leaves_teacher_bit_identical_and_out_of_checkpoint(mnist_teacher_ckpt, tmp_path):
    before = build_teacher(TeacherSpec(checkpoint=str(mnist_teacher_ckpt)), 10, 1, "t").state_dict()
    cli = main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), *DEBUG_TRAINER,
        "--trainer.limit_train_batches=5", *logger_args(tmp_path / "logs"),
        f"--model.teacher.checkpoint={mnist_teacher_ckpt}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--test_after_fit=false",
    ])
    after = cli.model.teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not cli.model.teacher.training
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith(("student.", "heads.")) for k in ckpt["state_dict"])
    assert ckpt["kd_teacher_fingerprints"] == cli.model.teacher_fingerprints
    # load_from_checkpoint rebuilds the teacher from its source recorded in the hparams
    restored = DistillationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert restored.teacher_fingerprints == cli.model.teacher_fingerprints
    s_new, s_old = restored.student.state_dict(), cli.model.student.state_dict()
    assert all(torch.equal(s_new[k], s_old[k].cpu()) for k in s_old)


def test_bad_head_weights_are_rejected(mnist_teacher_ckpt):
    spec = TeacherSpec(checkpoint=str(mnist_teacher_ckpt))
    with pytest.raises(ConfigError, match="weight"):
        CrossEntropy(weight=-0.5)
    with pytest.raises(ConfigError, match="all head weights are 0") as err:
        DistillationModule(teacher=spec, heads=[CrossEntropy(0.0), KLDivergence(0.0)])
    assert err.value.field == "model.heads"


def test_teacher_and_data_class_counts_must_match(mnist_teacher_ckpt):
    with pytest.raises(ConfigError, match="10 classes but the data has 100") as err:
        DistillationModule(teacher=TeacherSpec(checkpoint=str(mnist_teacher_ckpt)), num_classes=100)
    assert err.value.field == "model.teacher.checkpoint"


def test_teacher_from_model_name_and_weights_file(tmp_path):
    from kd_lightning.models import create_model

    src = create_model("lenet5", 10, 1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    module = DistillationModule(teacher=TeacherSpec(model="lenet5", weights=str(tmp_path / "w.pt")))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), module.teacher.state_dict().values()))


def test_load_from_checkpoint_restores_heads_with_adapters(mnist_teacher_ckpt, tmp_path):
    """Heads are saved as config in the hparams, so adapter weights find their modules."""
    cli = main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), "-c", str(CONFIGS / "kd" / "fitnet.yaml"),
        *DEBUG_TRAINER, *logger_args(tmp_path / "logs"), "--test_after_fit=false",
        f"--model.teacher.checkpoint={mnist_teacher_ckpt}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ])
    restored = DistillationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert [type(h).__name__ for h in restored.heads] == [type(h).__name__ for h in cli.model.heads]
    want, got = cli.model.heads.state_dict(), restored.heads.state_dict()
    assert want and all(torch.equal(want[k].cpu(), got[k]) for k in want)
