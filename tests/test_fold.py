"""BatchNorm folded into frozen teachers (issue 25): the same logits and feature taps as the
network as built, to fp32 rounding; untraceable models fall back or stay as they are; the
fingerprint, checkpoints and resume do not see the fold."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kd_lightning.losses import CrossEntropy, FitNet, KLDivergence
from kd_lightning.models import model_from_config
from kd_lightning.models.fold import fold_batchnorm
from kd_lightning.models.registry import _REGISTRY
from kd_lightning.modules import DistillationModule
from kd_lightning.modules.features import FeatureTaps
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import TeacherSpec, fingerprint, freeze

#: fp32 rounding of a folded network, relative to its largest logit
RTOL = 1e-5
#: the zoo's largest networks (several seconds each on 2 cores)
HEAVY = {"ResNet50", "vgg16", "vgg19", "resnet110", "wrn_40_2", "resnet32x4"}
IMAGE_MODELS = [
    pytest.param(k, marks=pytest.mark.slow) if k in HEAVY else k
    for k in sorted(k for k, e in _REGISTRY.items() if e.family != "text")
]


def _shape(name: str) -> tuple[int, int, int]:
    size = _REGISTRY[name].input_size if name in _REGISTRY else 32
    return (1, 28, 28) if size == 28 else (3, min(size, 64), min(size, 64))


def _calibrated(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Non-trivial BatchNorm running statistics (a few train-mode forwards on shifted,
    scaled inputs; random affine γ, β), then frozen."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.5
            if m.affine:
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.2, 0.2, generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, *shape, generator=g) * 2 + 0.5)
    return freeze(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_folds(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = _calibrated(
        model_from_config(name, 10, {"in_channels": shape[0]}, "model", None), shape
    )
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    before = fingerprint(model)
    # no check batch: the comparison below is the check (and half the cost)
    report = fold_batchnorm(model)
    # every model with BatchNorm gets folds (pre-activation ones keep the BatchNorms that
    # follow no convolution: wrn's bn1, ShuffleNet's after a shuffle)
    # (vgg cannot be traced by fx: its pairs are found inside its nn.Sequential stages)
    assert bool(report.folded) == has_bn, report
    with torch.no_grad():
        assert _rel(model(x), ref) < RTOL
    if has_bn:
        assert fingerprint(model) != before  # the fold happened (and is why set_teachers
        # fingerprints first)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_zoo_model_folds_to_the_same_logits(name):
    _check_folds(name, _shape(name))


# timm: its BatchNormAct2d (BatchNorm, then an activation) folds to the activation alone
@pytest.mark.parametrize(
    "name", ["tv:resnet18", pytest.param("timm:mobilenetv3_small_050", marks=pytest.mark.slow)]
)
def test_tv_and_timm_models_fold_to_the_same_logits(name):
    _check_folds(name, (3, 32, 32))


def test_feature_taps_see_the_same_tensors():
    """Taps on a BatchNorm's output, on ``:input`` pre-activations, on a block and on what a
    fold would change (a conv's output, a BatchNorm's input: those pairs stay unfolded)."""
    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = _calibrated(model_from_config("resnet8", 10, {"in_channels": 3}, "model", None), shape)
    layers = [
        "layer1.0.bn1",
        "layer1.0.relu:input",
        "layer2",
        "layer2.0.conv1",
        "layer3.0.bn2:input",
        "stem.2:input",
    ]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    unfolded = copy.deepcopy(model)
    report = fold_batchnorm(model, (x,), keep=layers)
    assert ("layer1.0.conv1", "layer1.0.bn1") in report.folded
    assert ("layer2.0.conv1", "layer2.0.bn1") not in report.folded
    assert ("layer3.0.conv2", "layer3.0.bn2") not in report.folded
    assert isinstance(model.layer1[0].bn1, nn.Identity)  # the name still exists
    with torch.no_grad():
        ref, new = FeatureTaps(unfolded, layers, "t")(x), FeatureTaps(model, layers, "t")(x)
    assert _rel(new.logits, ref.logits) < RTOL
    for name in layers:
        assert _rel(new.features[name], ref.features[name]) < RTOL, name


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self, reuse: bool = False) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.reuse = reuse

    def forward(self, x):
        if x.sum() > -1e9:
            x = x * 1.0
        out = self.seq(x)
        # the conv's own output used elsewhere too: folding it would change this term
        return out + self.seq[0](x) if self.reuse else out


def test_untraceable_models_fold_sequential_pairs_or_are_left_alone():
    x = torch.randn(2, 3, 8, 8)
    model = _calibrated(_Untraceable(), (3, 8, 8))
    ref = model(x)
    report = fold_batchnorm(model, (x,))
    assert report.method == "sequential" and report.folded == [("seq.0", "seq.1")]
    assert _rel(model(x), ref) < RTOL
    # a wrong fold is caught by the check on a random batch and undone
    model = _calibrated(_Untraceable(reuse=True), (3, 8, 8))
    ref = model(x)
    report = fold_batchnorm(model, (x,))
    assert not report.folded and "undone" in report.skipped
    assert isinstance(model.seq[1], nn.BatchNorm2d) and torch.equal(model(x), ref)


def test_linear_batchnorm1d_folds():
    model = _calibrated(
        nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)), (5,)
    )
    x = torch.randn(3, 5)
    ref = model(x)
    assert fold_batchnorm(model, (x,)).folded == [("0", "1")]
    assert _rel(model(x), ref) < RTOL


def _module(fold: bool) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        student="resnet8",
        teacher=TeacherSpec(model="resnet8", allow_untrained=True),
        num_classes=10,
        input_shape=(3, 16, 16),
        heads=[
            CrossEntropy(0.1),
            KLDivergence(0.9),
            FitNet(1.0, student_layers=["layer2"], teacher_layers=["layer2.0.bn2"]),
        ],
        performance=Performance(fold_teacher_bn=fold, channels_last=False),
    )


def test_distillation_module_folds_after_fingerprinting():
    folded, plain = _module(True), _module(False)
    assert folded.fold_reports[0].folded and not plain.fold_reports[0].folded
    assert folded.teacher_fingerprints == plain.teacher_fingerprints
    # teachers are not in the checkpoint, folded or not
    assert folded.state_dict().keys() == plain.state_dict().keys()
    assert all(not k.startswith("_teachers") for k in folded.state_dict())
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.arange(4)}
    a, b = folded.teacher_forward(batch).members[0], plain.teacher_forward(batch).members[0]
    assert _rel(a.logits, b.logits) < RTOL
    assert _rel(a.features["layer2.0.bn2"], b.features["layer2.0.bn2"]) < RTOL


def test_kd_fit_with_a_folded_teacher_resumes(cifar_teacher_ckpt, cifar10_root, tmp_path):
    """A fit against a folded BatchNorm teacher saves the unfolded teacher's fingerprint
    and no teacher weights, and resumes from its checkpoint against the rebuilt teacher."""
    from kd_lightning.checkpoints import read_checkpoint
    from kd_lightning.cli import main
    from kd_lightning.modules.teacher import build_teacher
    from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args

    base = [
        "fit", "-c", str(CONFIGS / "data" / "cifar10.yaml"),
        "--model=kd_lightning.modules.DistillationModule", "--model.init_args.student=resnet8",
        f"--model.init_args.teacher.checkpoint={cifar_teacher_ckpt}",
        f"--data.init_args.data_dir={cifar10_root}", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=16", *DEBUG_TRAINER,
        "--trainer.limit_val_batches=1", *logger_args(tmp_path / "logs"),
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}", "--checkpoint.save_last=true",
    ]
    main(base)
    ckpt = read_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"), "ckpt_path", "")
    plain = build_teacher(TeacherSpec(checkpoint=str(cifar_teacher_ckpt)), 10, 3, "model.teacher")
    assert ckpt["kd_teacher_fingerprints"] == [fingerprint(plain)]
    assert not any("teacher" in k and "head" not in k for k in ckpt["state_dict"])
    cli = main([*base, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", "--trainer.max_epochs=2"])
    assert cli.model.fold_reports[0].folded and cli.trainer.current_epoch == 2
