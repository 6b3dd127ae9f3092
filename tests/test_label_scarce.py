"""Label-scarce distillation: labelled subsets, transfer sets, masking in the heads."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.cli import main
from kd_lightning.data import BundledMNISTDataModule, MNISTDataModule
from kd_lightning.data import mnist as mnist_data
from kd_lightning.data.transfer import ArrayFileSource, AugmentedCopies, TransferContext
from kd_lightning.errors import ConfigError
from kd_lightning.losses import DKD, CrossEntropy, FitNet, KLDivergence, LogitMSE
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from kd_lightning.modules import DistillationModule
from kd_lightning.modules.teacher import TeacherSpec
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


@pytest.fixture(scope="module")
def bundled_arrays():
    return mnist_data.load_bundled_mnist()


@pytest.fixture
def bundled(monkeypatch, bundled_arrays):
    """BundledMNIST factory that parses the CSV once. The cached tensors are shared by every
    DataModule built here, so any in-place change to the source labels would show up."""
    images, labels = bundled_arrays
    source = (images, labels.clone())
    monkeypatch.setattr(mnist_data, "load_bundled_mnist", functools.lru_cache()(lambda path=None: source))

    def make(**kwargs) -> BundledMNISTDataModule:
        dm = BundledMNISTDataModule(augment=False, **kwargs)
        dm.setup()
        return dm

    make.labels = labels
    make.source = source
    return make


def _label_of(dm) -> dict[int, int]:
    ds = dm.train_set
    return dict(zip(ds.indices.tolist(), ds.labels[ds.indices].tolist()))


# -- the labelled subset ----------------------------------------------------------------
def test_labelled_subset_is_stratified_seeded_and_disjoint_from_val_test(bundled):
    full = bundled()
    dm = bundled(labeled_fraction=0.1, labeled_seed=3)
    labels = bundled.labels
    lab = dm.labeled_indices

    # stratified: 10% of the 350 train digits of every class
    assert torch.bincount(labels[lab], minlength=10).tolist() == [35] * 10
    assert dm.class_counts().tolist() == [35] * 10
    # chosen from the train split only; val/test are exactly the full-label ones
    train_rows = set(full.train_set.indices.tolist())
    assert set(lab.tolist()) <= train_rows
    assert not set(lab.tolist()) & set(dm.val_set.indices.tolist())
    assert not set(lab.tolist()) & set(dm.test_set.indices.tolist())
    for split in ("val_set", "test_set"):
        a, b = getattr(dm, split), getattr(full, split)
        assert torch.equal(a.indices, b.indices)
        assert (a.labels[a.indices] >= 0).all() and torch.equal(a.labels[a.indices], labels[a.indices])

    # the transfer set is the whole train split; the dataset itself yields -1 off the subset
    assert set(dm.train_set.indices.tolist()) == train_rows
    assert dm.num_unlabelled == len(train_rows) - len(lab) == 3150
    seen = {int(b["index"]): int(b["label"]) for b in (dm.train_set[i] for i in range(200))}
    for idx, y in seen.items():
        assert y == (int(labels[idx]) if idx in set(lab.tolist()) else -1)
    # hiding labels never touched the source array shared with val/test
    assert torch.equal(bundled.source[1], labels)

    # seeded: same seed → same subset, another seed → another; the data split stays put
    assert torch.equal(bundled(labeled_fraction=0.1, labeled_seed=3).labeled_indices, lab)
    other = bundled(labeled_fraction=0.1, labeled_seed=4)
    assert not torch.equal(other.labeled_indices, lab)
    assert torch.equal(other.val_set.indices, dm.val_set.indices)

    # train_on=labeled: the scratch baseline sees the subset, with its labels
    scratch = bundled(labeled_fraction=0.1, labeled_seed=3, train_on="labeled")
    assert torch.equal(scratch.train_set.indices, lab) and scratch.num_unlabelled == 0


def test_num_labeled_and_the_generic_datamodule_path(mnist_root):
    dm = MNISTDataModule(data_dir=str(mnist_root), num_labeled=40, augment=False)
    dm.setup()
    ds = dm.train_set
    train_labels = ds.labels[ds.indices]
    assert int((train_labels >= 0).sum()) == len(dm.labeled_indices) == 40
    assert len(ds) == len(dm.labeled_indices) + dm.num_unlabelled
    # the test split (a separate array) is untouched
    assert (dm.test_set.labels >= 0).all()
    scratch = MNISTDataModule(data_dir=str(mnist_root), num_labeled=40, train_on="labeled")
    scratch.setup()
    assert torch.equal(scratch.train_set.indices, dm.labeled_indices)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"labeled_fraction": 0.1, "num_labeled": 10}, "data.num_labeled"),
        ({"labeled_fraction": 0.0}, "data.labeled_fraction"),
        ({"labeled_fraction": 1.5}, "data.labeled_fraction"),
        ({"num_labeled": 0}, "data.num_labeled"),
        ({"train_on": "unlabeled"}, "data.train_on"),
        ({"train_on": "labeled", "extra_transfer": AugmentedCopies(1)}, "data.train_on"),
        ({"extra_transfer": "images.npz"}, "data.extra_transfer"),
    ],
)
def test_bad_label_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        BundledMNISTDataModule(**kwargs)
    assert err.value.field == field


def test_labeled_seed_run_follows_seed_everything(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    with pytest.raises(ConfigError, match="no run seed"):
        BundledMNISTDataModule(labeled_fraction=0.1, labeled_seed="run")
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    assert BundledMNISTDataModule(labeled_fraction=0.1, labeled_seed="run").labeled_seed == 5
    assert BundledMNISTDataModule(seed=2).labeled_seed == 2  # default: the split seed
    with pytest.raises(ConfigError):
        BundledMNISTDataModule(labeled_seed="five")


def test_too_many_labels_is_a_config_error(bundled):
    with pytest.raises(ConfigError, match="only 3500"):
        bundled(num_labeled=5000)


# -- extra transfer data ------------------------------------------------------------------
def test_array_file_source_joins_unlabelled_with_offset_indices(bundled, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "extra.npz", images=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))
    dm = bundled(labeled_fraction=0.1, extra_transfer=ArrayFileSource(str(tmp_path / "extra.npz")))
    ds, n_source = dm.train_set, len(bundled.labels)
    assert len(ds) == 3500 + 30 and dm.num_unlabelled == 3150 + 30
    extra_idx = ds.indices[-30:]
    assert torch.equal(extra_idx, torch.arange(n_source, n_source + 30))  # after every real row
    assert not set(extra_idx.tolist()) & set(ds.indices[:-30].tolist())
    item = ds[len(ds) - 1]
    assert item["label"] == -1 and item["image"].shape == (1, 28, 28)
    # the val split still indexes the unextended source array
    assert dm.val_set.images is bundled.source[0]

    # (N, C, H, W) .pt dicts work with a key; a seeded subset via max_samples
    torch.save({"x": torch.zeros(12, 1, 28, 28, dtype=torch.uint8), "y": torch.zeros(12)}, tmp_path / "e.pt")
    dm = bundled(extra_transfer=ArrayFileSource(str(tmp_path / "e.pt"), key="x", max_samples=5))
    assert len(dm.train_set) == 3505 and dm.num_unlabelled == 5


@pytest.mark.parametrize(
    ("array", "key", "match"),
    [
        (np.zeros((4, 28, 28), np.float32), None, "uint8"),
        (np.zeros((4, 32, 32, 3), np.uint8), None, "do not match"),
        ({"a": np.zeros((4, 28, 28), np.uint8), "b": np.zeros(4)}, None, "name the image array"),
        ({"a": np.zeros((4, 28, 28), np.uint8)}, "b", "holds"),
    ],
)
def test_array_file_source_errors(tmp_path, array, key, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **(array if isinstance(array, dict) else {"images": array}))
    ctx = TransferContext(torch.zeros(10, 28, 28, 1, dtype=torch.uint8), torch.arange(8), torch.arange(2), 0)
    with pytest.raises(ConfigError, match=match):
        ArrayFileSource(str(path), key=key).images(ctx)
    with pytest.raises(ConfigError, match="no such file"):
        ArrayFileSource(str(tmp_path / "missing.npz")).images(ctx)


def test_augmented_copies_are_seeded_warps_of_the_labelled_images(bundled):
    images = bundled.source[0]
    ctx = TransferContext(images, torch.arange(100), torch.arange(10), seed=0)
    a = AugmentedCopies(copies=3).images(ctx)
    assert a.shape == (30, 28, 28, 1) and a.dtype == torch.uint8
    assert torch.equal(a, AugmentedCopies(copies=3).images(ctx))
    assert not torch.equal(a, AugmentedCopies(copies=3).images(TransferContext(images, ctx.train_indices, ctx.labeled_indices, 1)))
    # a warp keeps the digit's ink roughly (rotation ±10°, zoom 0.9–1.1, shift ≤ 10%)
    ink, warped = images[:10].float().sum((1, 2, 3)), a[:10].float().sum((1, 2, 3))
    assert ((warped / ink - 1).abs() < 0.35).all()
    assert not torch.equal(a[:10], images[:10])
    # identity parameters reproduce the images exactly
    same = AugmentedCopies(1, degrees=0, translate=0, scale=(1.0, 1.0)).images(ctx)
    assert torch.equal(same, images[:10])
    assert len(AugmentedCopies(2, of="train").images(ctx)) == 200


# -- unlabelled samples in the heads ------------------------------------------------------
def _fixed_batch():
    g = torch.Generator().manual_seed(0)
    n, c = 8, 10
    student = torch.randn(n, c, generator=g, requires_grad=True)
    teacher = torch.randn(n, c, generator=g) * 3
    labels = torch.tensor([3, -1, 0, -1, -1, 7, 9, -1])
    feats_s = torch.randn(n, 16, generator=g, requires_grad=True)
    feats_t = torch.randn(n, 24, generator=g)
    return student, teacher, labels, feats_s, feats_t


@pytest.mark.parametrize(
    "head",
    [CrossEntropy(), CrossEntropy(label_smoothing=0.2), DKD(alpha=1.0, beta=8.0, temperature=4.0)],
    ids=["ce", "ce_smooth", "dkd"],
)
def test_label_heads_ignore_unlabelled_samples(head):
    student, teacher, labels, _, _ = _fixed_batch()
    keep = labels >= 0
    loss = head(ModelOutput(student), TeacherOutput([ModelOutput(teacher)]), {"label": labels})
    # reference: the same head on the labelled rows alone
    ref = head(
        ModelOutput(student[keep]), TeacherOutput([ModelOutput(teacher[keep])]), {"label": labels[keep]}
    )
    torch.testing.assert_close(loss, ref)
    if isinstance(head, CrossEntropy):  # and against the textbook formula
        textbook = F.cross_entropy(student[keep], labels[keep], label_smoothing=head.label_smoothing)
        torch.testing.assert_close(loss, textbook)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.all(grad[~keep] == 0) and grad[keep].abs().sum() > 0


@pytest.mark.parametrize("head", [KLDivergence(temperature=4.0), LogitMSE()], ids=["kd", "mse"])
def test_teacher_only_heads_use_every_sample(head):
    student, teacher, labels, _, _ = _fixed_batch()
    out = head(ModelOutput(student), TeacherOutput([ModelOutput(teacher)]), {"label": labels})
    hidden = head(ModelOutput(student), TeacherOutput([ModelOutput(teacher)]), {"label": torch.full_like(labels, -1)})
    torch.testing.assert_close(out, hidden)  # labels, present or not, change nothing
    if isinstance(head, KLDivergence):
        t = head.temperature
        p_t = F.softmax(teacher / t, 1)
        ref = (p_t * (p_t.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
        torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out, student)
    assert (grad.abs().sum(1) > 0).all()  # every sample, labelled or not, gets a gradient


def test_all_unlabelled_batch_gives_finite_loss_and_gradients():
    module = DistillationModule(
        student="mlp_tiny",
        teacher=TeacherSpec(model="mlp_tiny", allow_untrained=True),
        heads=[CrossEntropy(0.1, label_smoothing=0.1), KLDivergence(0.9), DKD(1.0),
               FitNet(1.0, student_layers="layer1", teacher_layers="layer1")],
    )
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(6, 1, 28, 28, generator=g), "label": torch.full((6,), -1)}
    teacher = module.teacher_forward(batch)
    student = module._student_taps(batch["image"])
    loss, terms = module.compute_loss(student, teacher, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(t) for t in terms.values())
    assert terms["ce"] == 0 and terms["dkd"] == 0 and terms["kd"] > 0 and terms["fitnet"] > 0
    loss.backward()
    grads = [p.grad for p in module.student.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0  # the teacher-only heads still train it


# -- the configs ---------------------------------------------------------------------------
def test_label_scarce_configs_debug_fit(mnist_teacher_ckpt, tmp_path):
    cfg = CONFIGS / "label_scarce"
    scratch = main([
        "fit", "-c", str(cfg / "scratch.yaml"), *DEBUG_TRAINER, *logger_args(tmp_path / "logs"),
        f"--checkpoint.dirpath={tmp_path / 'scratch'}", "--seed_everything=7",
    ])
    # labeled_seed: run → the subset follows seed_everything
    assert scratch.datamodule.labeled_seed == 7
    assert scratch.datamodule.num_unlabelled == 0 and len(scratch.datamodule.train_set) == 350
    assert "test/acc" in scratch.trainer.callback_metrics
    kd = main([
        "fit", "-c", str(cfg / "kd.yaml"), *DEBUG_TRAINER, *logger_args(tmp_path / "logs"),
        f"--checkpoint.dirpath={tmp_path / 'kd'}", f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
        "--data.extra_transfer=kd_lightning.data.transfer.AugmentedCopies",
        "--data.extra_transfer.copies=2", "--seed_everything=7",
    ])
    dm = kd.datamodule
    # the same seed gives KD the scratch run's labelled digits: a paired comparison
    assert torch.equal(dm.labeled_indices, scratch.datamodule.labeled_indices)
    assert len(dm.train_set) == 3500 + 700 and dm.num_unlabelled == 3150 + 700
    # check_finite would have stopped a non-finite loss; both batches trained
    assert kd.trainer.global_step == 2 and "test/acc" in kd.trainer.callback_metrics


def test_classifier_refuses_unlabelled_training_data(tmp_path):
    with pytest.raises(ConfigError, match="train_on=labeled") as err:
        main([
            "fit", "-c", str(CONFIGS / "label_scarce" / "scratch.yaml"), *DEBUG_TRAINER,
            *logger_args(tmp_path / "logs"), f"--checkpoint.dirpath={tmp_path}", "--data.train_on=all",
        ])
    assert err.value.field == "data.train_on"


def test_label_scarce_experiment_file_parses():
    from kd_lightning.experiment.spec import parse_spec

    spec = parse_spec(["--config", str(CONFIGS / "experiments" / "label_scarce.yaml")])
    assert spec.seeds == [0, 1, 2, 3, 4]
    assert [s.name for _, s in spec.stages()] == ["teacher", "scratch_10pct", "kd_10pct", "kd_100pct"]
