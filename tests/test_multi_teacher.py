"""Two teachers: the ensemble targets, per-teacher metrics, frozen teachers, teacher_index."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from kd_lightning.losses import CrossEntropy, KLDivergence, LossHead, ModelOutput, TeacherOutput
from kd_lightning.models import create_model
from kd_lightning.modules import DistillationModule, TeacherSpec
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


@pytest.fixture(scope="module")
def second_teacher_weights(tmp_path_factory) -> Path:
    """A differently-shaped second teacher (an MLP), as a bare state_dict file."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher1") / "mlp_small.pt"
    torch.save(create_model("mlp_small", 10, 1).state_dict(), path)
    return path


def _specs(ckpt: Path, weights: Path) -> list[TeacherSpec]:
    return [
        TeacherSpec(checkpoint=str(ckpt), weight=3.0),
        TeacherSpec(model="mlp_small", weights=str(weights), weight=1.0),
    ]


class TeacherProbe(LossHead):
    """Records which teacher features it was given; contributes nothing to the loss."""

    default_name = "probe"

    def __init__(self, teacher_index: int = 0, layer: str = "features") -> None:
        super().__init__(weight=0.0)
        self.teacher_index = teacher_index
        self.layer = layer
        self.built_with: torch.Size | None = None
        self.seen: torch.Size | None = None

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (self.layer,)

    def build(self, student_shapes, teacher_shapes) -> None:
        self.built_with = teacher_shapes[self.layer]

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch) -> Tensor:
        self.seen = teacher.member(self.teacher_index).features[self.layer].shape
        return student.logits.sum() * 0.0


def _batch(n: int = 8) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 1, 28, 28, generator=g),
        "label": torch.randint(0, 10, (n,), generator=g),
        "index": torch.arange(n),
    }


def test_ensemble_is_weighted_mean_of_member_probs(mnist_teacher_ckpt, second_teacher_weights):
    module = DistillationModule(student="mlp_tiny", teacher=_specs(mnist_teacher_ckpt, second_teacher_weights))
    batch = _batch()
    out = module.teacher_forward(batch)
    assert len(out.members) == 2
    with torch.no_grad():
        l0, l1 = (t(batch["image"]) for t in module.teachers)
    for temperature in (1.0, 4.0):
        expected = 0.75 * F.softmax(l0 / temperature, 1) + 0.25 * F.softmax(l1 / temperature, 1)
        torch.testing.assert_close(out.probs(temperature), expected)
        torch.testing.assert_close(out.log_probs(temperature), expected.log())
    torch.testing.assert_close(out.member(1).logits, l1)
    assert torch.equal(out.argmax(), expected.argmax(1))


def test_both_teachers_frozen_and_outside_the_module(mnist_teacher_ckpt, second_teacher_weights):
    module = DistillationModule(student="mlp_tiny", teacher=_specs(mnist_teacher_ckpt, second_teacher_weights))
    module.train()
    own = {id(p) for p in module.parameters()}
    for teacher in module.teachers:
        assert not teacher.training
        assert all(not p.requires_grad and id(p) not in own for p in teacher.parameters())
    assert all(k.startswith(("student.", "heads.")) for k in module.state_dict())
    assert len(module.teacher_fingerprints) == 2
    assert module.teacher_fingerprints[0] != module.teacher_fingerprints[1]


def test_feature_head_reads_the_teacher_it_names(mnist_teacher_ckpt, second_teacher_weights):
    probe = TeacherProbe(teacher_index=1)
    module = DistillationModule(
        student="mlp_tiny",
        teacher=_specs(mnist_teacher_ckpt, second_teacher_weights),
        heads=[CrossEntropy(1.0), probe],
    )
    # only teacher 1 (the 2×800 MLP) is hooked; its pre-logit features are 800-wide
    assert module._teacher_taps[0].layers == [] and module._teacher_taps[1].layers == ["features"]
    assert probe.built_with == torch.Size([2, 800])
    batch = _batch(4)
    loss, terms = module.compute_loss(
        module._student_taps(batch["image"]), module.teacher_forward(batch), batch
    )
    assert probe.seen == torch.Size([4, 800]) and torch.isfinite(loss) and "probe" in terms

    with pytest.raises(ConfigError, match=r"model\.heads\.probe\.teacher_index"):
        DistillationModule(
            student="mlp_tiny", teacher=_specs(mnist_teacher_ckpt, second_teacher_weights),
            heads=[KLDivergence(1.0), TeacherProbe(teacher_index=2)],
        )


def test_multi_teacher_yaml_logs_each_teacher_and_the_ensemble(
    tmp_path, mnist_teacher_ckpt, second_teacher_weights
):
    # the shipped config, with its teacher list pointed at the test's two teachers.
    # jsonargparse merges a list of dataclasses item by item: unset fields must be nulled.
    override = tmp_path / "teachers.yaml"
    override.write_text(
        "model:\n  init_args:\n    teacher:\n"
        f"      - {{checkpoint: {mnist_teacher_ckpt}, weight: 2.0}}\n"
        f"      - {{checkpoint: null, model: mlp_small, weights: {second_teacher_weights}, weight: 1.0}}\n"
    )
    cli = main([
        "fit", "-c", str(CONFIGS / "kd" / "multi_teacher.yaml"), "-c", str(override),
        *DEBUG_TRAINER, *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ])
    module = cli.model
    assert len(module.hparams.teacher) == 2
    assert module.teacher_weights == [2.0, 1.0]

    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    logged = {k for row in rows for k, v in row.items() if v}
    for stage in ("val", "test"):
        for key in ("teacher_acc", "teacher0_acc", "teacher1_acc", "teacher0_ece", "acc"):
            assert f"{stage}/{key}" in logged, key

    ckpt = torch.load(tmp_path / "ckpt" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith(("student.", "heads.")) for k in ckpt["state_dict"])
    assert len(ckpt["kd_teacher_fingerprints"]) == 2
