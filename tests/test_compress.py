"""Distil → prune → KD fine-tune → quantize → export → report, on the bundled-MNIST pair."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.cli import main as cli_main
from kd_lightning.compress import (
    FinetuneConfig,
    QuantizeConfig,
    compress,
    count_params,
    kd_finetune,
    load_student,
    make_permanent,
    prune_model,
    quantize_dynamic,
    quantize_static,
    weight_sparsity,
)
from kd_lightning.compress.export import compare
from kd_lightning.compress.prune import prunable_modules, zero_channels
from kd_lightning.data import BundledMNISTDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model
from kd_lightning.modules.teacher import TeacherSpec
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory, mnist_teacher_ckpt) -> Path:
    """A quickly distilled mlp_tiny student (the quickstart KD config, a few batches)."""
    out = tmp_path_factory.mktemp("kd_student")
    cli_main([
        "fit", "-c", str(CONFIGS / "quickstart" / "kd.yaml"), *DEBUG_TRAINER,
        "--trainer.limit_train_batches=15", f"--model.teacher.checkpoint={mnist_teacher_ckpt}",
        *logger_args(out / "logs"), f"--checkpoint.dirpath={out}", "--test_after_fit=false",
    ])
    return out / "best.ckpt"


@pytest.fixture(scope="module")
def mnist() -> BundledMNISTDataModule:
    dm = BundledMNISTDataModule(batch_size=64, eval_batch_size=200)
    dm.setup("fit")
    return dm


def _lenet(width: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet5", 10, 1, width=width).eval()


def test_global_unstructured_prunes_amount_and_spares_the_classifier():
    model = _lenet()
    pruned = prune_model(model, "global_unstructured", amount=0.5)
    assert pruned == ["layer1.0", "layer2.0", "layer3.0", "features.0"]  # fc kept dense
    assert hasattr(model.layer1[0], "weight_orig") and hasattr(model.layer1[0], "weight_mask")
    make_permanent(model)
    assert not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    ws = [m.weight for _, m in prunable_modules(model)]
    zeros, total = sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)
    assert zeros == round(0.5 * total)  # one global threshold: exactly half overall
    assert int((model.fc.weight == 0).sum()) == 0
    params, nonzero = count_params(model)
    assert params == sum(p.numel() for p in model.parameters()) and params - nonzero == zeros
    assert 0.0 < weight_sparsity(model) < 0.5


def test_ln_structured_zeroes_whole_output_channels():
    model = _lenet()
    prune_model(model, "ln_structured", amount=0.5, norm=2)
    make_permanent(model)
    for name, layer in prunable_modules(model):
        out_channels = layer.weight.shape[0]
        assert zero_channels(layer) == round(0.5 * out_channels), name
    assert zero_channels(model.fc) == 0
    with pytest.raises(ConfigError, match=r"prune\.amount=1\.5"):
        prune_model(_lenet(), "ln_structured", amount=1.5)


def test_structured_prune_then_kd_finetune_keeps_the_zeros(tmp_path, student_ckpt, mnist):
    src = load_student(str(student_ckpt))
    assert src.name == "mlp_tiny" and src.teachers and src.teachers[0].checkpoint
    cfg = FinetuneConfig(max_epochs=1, lr=1e-3, limit_train_batches=3, limit_val_batches=1)

    def prune_fn(model):
        return prune_model(model, "ln_structured", amount=0.25)

    before, after = kd_finetune(
        src.name, src.kwargs, src.state, src.teachers, mnist, src.num_classes, src.input_shape,
        cfg, tmp_path, prune_fn=prune_fn,
    )
    w_before, w_after = before.layer1[0].weight, after.layer1[0].weight
    dead = w_before.abs().sum(1) == 0
    assert int(dead.sum()) == 16  # 25% of 64 hidden units
    assert torch.all(w_after[dead] == 0), "fine-tuning revived pruned channels"
    assert not torch.equal(w_before[~dead], w_after[~dead]), "fine-tuning changed nothing"
    assert not any(k.endswith(("_orig", "_mask")) for k in after.state_dict())
    assert list((tmp_path / "finetune").rglob("metrics.csv"))


def test_dynamic_and_static_int8_track_fp32(mnist):
    model = _lenet(width=2)
    images = next(iter(mnist.test_dataloader()))["image"]
    ref = model(images)

    dynamic = quantize_dynamic(model)
    assert type(dynamic.fc).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert isinstance(dynamic.layer1[0], nn.Conv2d)  # convs stay fp32 in dynamic mode
    calibration = [b["image"] for b in itertools.islice(mnist.train_dataloader(), 4)]
    static = quantize_static(model, calibration)
    for q in (dynamic, static):
        out = q(images)
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        assert count_params(q)[0] == count_params(model)[0]
    with pytest.raises(ConfigError, match="quantize.calibration_batches"):
        quantize_static(model, [])
    with pytest.raises(ConfigError, match="quantize.backend='tpu'"):
        quantize_dynamic(model, backend="tpu")


def test_export_check_catches_a_mismatch():
    model = _lenet()
    x = [torch.randn(1, 1, 28, 28), torch.randn(5, 1, 28, 28)]
    assert compare(lambda t: model(t), model, x, atol=1e-6, rtol=0)[1]
    diff, ok = compare(lambda t: model(t) + 1e-3, model, x, atol=1e-4, rtol=0)
    assert not ok and diff == pytest.approx(1e-3, rel=1e-3)


def test_compress_command_end_to_end(tmp_path, student_ckpt, capsys):
    out = tmp_path / "compress"
    result = cli_main([
        "compress", "-c", str(CONFIGS / "compress" / "mnist.yaml"),
        f"--checkpoint={student_ckpt}", f"--output_dir={out}",
        "--finetune.max_epochs=1", "--finetune.limit_train_batches=4", "--finetune.limit_val_batches=1",
        "--quantize.calibration_batches=2", "--benchmark.repeats=3", "--benchmark.warmup=1",
        "--benchmark.max_test_batches=1",
    ])
    names = [r.model for r in result.rows]
    assert names == ["teacher", "student", "pruned", "pruned_kd", "int8_dynamic", "int8_static"]
    # issue 22: every long pass shows a bar (tqdm on stderr; the fine-tune is Lightning's)
    printed = capsys.readouterr()
    for bar in ("test accuracy: teacher", "test accuracy: int8_static", "calibration",
                "timing 6 models", "export"):
        assert f"[compress] {bar}" in printed.err, bar
    assert "Epoch 0" in printed.out + printed.err
    student, pruned_kd = result.row("student"), result.row("pruned_kd")
    # half of the hidden layer's weights (784×64) pruned; the classifier stays dense
    assert student.params - pruned_kd.nonzero_params == pytest.approx(784 * 64 // 2, abs=64)
    assert result.row("teacher").params > student.params
    for r in result.rows:
        assert 0.0 <= r.test_acc <= 1.0 and set(r.latency_ms) == {1, 64}
        assert all(ms > 0 for ms in r.latency_ms.values()) and r.size_mb > 0
    assert result.row("int8_static").size_mb < 0.5 * student.size_mb
    assert pruned_kd.gzip_mb < student.gzip_mb  # zeros compress
    assert [(e.format, e.ok) for e in result.exports] == [
        ("onnx", True), ("torch.export", True), ("torchscript", True)
    ]
    assert all(Path(e.path).is_file() for e in result.exports)

    md = (out / "report.md").read_text()
    assert "| pruned_kd |" in md and "latency b=64 (ms)" in md and "## Exports" in md
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["model"] for r in rows] == names and "latency_b1_ms" in rows[0]
    assert (out / "config.yaml").is_file() and (out / "models" / "pruned_kd.pt").is_file()
    # the saved pruned student is a plain state_dict: it loads into a fresh model
    fresh = create_model("mlp_tiny", 10, 1)
    fresh.load_state_dict(torch.load(out / "models" / "pruned_kd.pt"))
    # issue 21: a second run into the same output_dir is refused before any work, nothing lost
    with pytest.raises(ConfigError, match=r"output_dir=.*earlier compress run: pass --overwrite"):
        cli_main(["compress", "-c", str(CONFIGS / "compress" / "mnist.yaml"),
                  f"--checkpoint={student_ckpt}", f"--output_dir={out}"])
    assert (out / "report.md").read_text() == md


def test_bad_inputs_fail_before_any_work(tmp_path, mnist_teacher_ckpt, student_ckpt):
    dm = BundledMNISTDataModule()
    with pytest.raises(ConfigError, match="checkpoint='missing.ckpt'"):
        compress("missing.ckpt", dm, output_dir=str(tmp_path))
    # a ClassifierModule checkpoint names no teacher
    with pytest.raises(ConfigError, match="teacher=None"):
        compress(str(mnist_teacher_ckpt), dm, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="quantize.calibration_batches=0"):
        compress(str(student_ckpt), dm, quantize=QuantizeConfig(calibration_batches=0))
    with pytest.raises(ConfigError, match="quantize.backend='tpu'"):
        compress(str(student_ckpt), dm, quantize=QuantizeConfig(backend="tpu"))
    # issue 21: a teacher with random weights is refused before anything is written
    with pytest.raises(ConfigError, match=r"teacher\.model='lenet5'.*teacher\.allow_untrained: true"):
        compress(str(student_ckpt), dm, teacher=TeacherSpec(model="lenet5"), output_dir=str(tmp_path / "u"))
    assert not (tmp_path / "u").exists()
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.slow  # spawns the wandb-core service process
def test_report_logs_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from kd_lightning.compress.report import ModelReport, WandbConfig, log_wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables W&B; this test opts in
    rows = [ModelReport("student", "mlp_tiny", "fp32", 10, 8, 0.1, 0.05, {1: 0.1, 64: 1.0}, 0.9)]
    run_dir = log_wandb(rows, [], WandbConfig(enabled=True, mode="offline"), tmp_path, {"a": 1})
    assert run_dir and list((tmp_path / "wandb").glob("offline-run-*"))
    assert log_wandb(rows, [], WandbConfig(enabled=False), tmp_path, {}) is None
    assert log_wandb(rows, [], WandbConfig(enabled=True, mode="disabled"), tmp_path, {}) is None
    import wandb

    wandb.teardown()  # the wandb singleton would otherwise carry this run's settings into later tests
