"""Teacher-output cache: exact reuse keyed by (index, view), refusal of random augmentation,
and cached vs uncached training giving the same losses on the same views."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.data import CIFAR10DataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses import CrossEntropy, KLDivergence, LossHead, ModelOutput, TeacherOutput
from kd_lightning.modules import DistillationModule
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import TeacherSpec
from kd_lightning.modules.teacher_cache import TeacherCache


class FeatureMSE(LossHead):
    """A feature head (FitNets-style, 1×1 conv adapter), so teacher features get cached too."""

    default_name = "feat"

    def __init__(self, weight: float = 1.0, layer: str = "layer3", **kwargs) -> None:
        super().__init__(weight, **kwargs)
        self.layer = layer

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (self.layer,)

    def build(self, student_shapes, teacher_shapes) -> None:
        self.adapter = nn.Conv2d(student_shapes[self.layer][1], teacher_shapes[self.layer][1], 1)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch) -> Tensor:
        return F.mse_loss(self.adapter(student.features[self.layer]), teacher.features[self.layer])


# -- the cache on its own --------------------------------------------------------------------
def _images(index: Tensor, view: Tensor) -> Tensor:
    """A deterministic image per (index, view), as the data's augmentation views provide."""
    return torch.stack([
        torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(int(i) * 10 + int(v)))
        for i, v in zip(index, view)
    ])


def _teachers(x: Tensor | dict[str, Tensor]) -> list[ModelOutput]:
    """Two fake 'teachers': one with a feature map, one logits-only."""
    x = x["image"] if isinstance(x, dict) else x
    logits = x.sum((1, 2, 3))[:, None] * torch.arange(3.0)
    return [ModelOutput(logits, {"f": 2 * x[:, :1]}), ModelOutput(-logits, {})]


def test_cache_returns_teacher_outputs_and_runs_teachers_on_misses_only():
    cache, calls = TeacherCache(), []

    def compute(batch: dict[str, Tensor]) -> list[ModelOutput]:
        calls.append(len(batch["image"]))
        return _teachers(batch["image"])

    steps = [  # (indices, view): overlaps, a second view, an index that grows the table
        (torch.arange(0, 6), 0), (torch.arange(3, 9), 0), (torch.tensor([0, 1, 2]), 1),
        (torch.tensor([100, 4, 100]), 0), (torch.arange(0, 9), 0),
    ]
    for index, v in steps:
        view = torch.full_like(index, v)
        x = _images(index, view)
        out = cache("train", {"image": x, "index": index, "view": view}, compute)
        expected = _teachers(x)
        for got, want in zip(out, expected):
            torch.testing.assert_close(got.logits, want.logits)
            assert got.features.keys() == want.features.keys()
            for k in want.features:
                torch.testing.assert_close(got.features[k], want.features[k])
    assert calls == [6, 3, 3, 2]  # the last batch is all hits: no teacher call at all
    # 13 distinct entries; misses count the samples the teachers ran on (index 100 twice)
    assert len(cache) == 13 and cache.misses == 14 and cache.hits == 27 - 14
    # stages are separate tables: the same keys in "val" are misses
    index = torch.arange(3)
    view = torch.zeros_like(index)
    cache("val", {"image": _images(index, view), "index": index, "view": view}, compute)
    assert calls[-1] == 3


def test_batches_that_cannot_be_keyed_are_refused():
    cache = TeacherCache()
    x = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ConfigError, match="augment_views"):
        cache("train", {"image": x, "index": torch.arange(2), "view": torch.tensor([-1, -1])}, _teachers)
    with pytest.raises(ConfigError, match="teacher_cache"):
        cache("train", {"image": x, "index": torch.arange(2)}, _teachers)
    with pytest.raises(ConfigError, match="teacher_cache_device"):
        TeacherCache("cuda:3")  # type: ignore[arg-type]


# -- in training -------------------------------------------------------------------------------
def _module(cache: bool) -> DistillationModule:
    # A randomly initialised resnet8 teacher is as good as a trained one for checking that
    # cached outputs equal computed ones, and far cheaper than a checkpoint fixture.
    L.seed_everything(0)  # same teacher, student and adapter weights in every run
    return DistillationModule(
        student="resnet8",
        teacher=TeacherSpec(model="resnet8", allow_untrained=True),
        heads=[CrossEntropy(0.1), KLDivergence(0.9, temperature=4.0), FeatureMSE(0.5)],
        num_classes=10,
        input_shape=(3, 32, 32),
        performance=Performance(teacher_cache="memory" if cache else "off"),
    )


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(module: DistillationModule, data: CIFAR10DataModule, epochs: int) -> LossRecorder:
    L.seed_everything(0)
    recorder = LossRecorder()
    L.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    ).fit(module, data)
    return recorder


def test_random_augmentation_is_refused_before_any_step(cifar10_root):
    data = CIFAR10DataModule(data_dir=str(cifar10_root), batch_size=16)  # augment, no views
    module = _module(cache=True)

    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran before the configuration was refused")

    module.training_step = no_step
    with pytest.raises(ConfigError, match="data.augment_views.*deterministic"):
        _fit(module, data, 1)


@pytest.mark.parametrize("on_device", [True, False], ids=["tensor-path", "pil-path"])
def test_cached_and_uncached_training_give_the_same_losses(cifar10_root, on_device):
    """K = 2 views, 3 epochs: epoch 2 re-uses view 0, so its teacher outputs (logits and the
    feature head's maps) all come from the cache; the losses must not change."""

    def data() -> CIFAR10DataModule:  # 20 training images (2 per class): 3 batches
        return CIFAR10DataModule(
            data_dir=str(cifar10_root), batch_size=8, val_fraction=0.95,
            augment_views=2, augment_on_device=on_device,
        )

    cached = _module(cache=True)
    with_cache = _fit(cached, data(), 3)
    without = _fit(_module(cache=False), data(), 3)

    n = len(cached.trainer.datamodule.train_set)
    table = cached.teacher_cache.tables["train"]
    assert int(table.filled.sum()) == n * 2  # every image, both views
    assert cached.teacher_cache.hits >= n  # all of epoch 2 at least
    assert len(with_cache.losses) == len(without.losses) == 3 * -(-n // 8)
    torch.testing.assert_close(torch.tensor(with_cache.losses), torch.tensor(without.losses),
                               rtol=1e-4, atol=1e-6)


def test_view_check_is_per_batch_unless_the_datamodule_vouched_at_setup(cifar10_root):
    # A kd-lightning DataModule is checked once at setup (no per-batch host sync) ...
    data = CIFAR10DataModule(data_dir=str(cifar10_root), batch_size=8, val_fraction=0.95, augment_views=2)
    module = _module(cache=True)
    _fit(module, data, 1)
    assert module.teacher_cache.data_checked

    # ... any other source of batches keeps the per-batch refusal of random views
    class OneBatch:  # an iterable, not a list (which Lightning reads as several loaders)
        def __iter__(self):
            yield {"image": torch.zeros(2, 3, 32, 32), "label": torch.zeros(2, dtype=torch.long),
                   "index": torch.arange(2), "view": torch.tensor([-1, -1])}

        def __len__(self) -> int:
            return 1

    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            return OneBatch()

    module = _module(cache=True)
    with pytest.raises(ConfigError, match="augment_views"):
        _fit(module, Plain(), 1)
    assert not module.teacher_cache.data_checked
