"""teacher_precision (issue 25): where bf16 counts as fast, and a half-precision teacher
whose outputs still reach the heads in fp32."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.modules import DistillationModule
from kd_lightning.modules import performance as perf
from kd_lightning.modules.performance import Performance, cpu_bf16_flags, fast_bf16, teacher_dtype
from kd_lightning.modules.teacher import TeacherSpec

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 1\n"


@pytest.mark.parametrize(
    ("extra", "capability", "expected"),
    [
        ("avx512_bf16", "AVX512", ("avx512_bf16",)),
        ("amx_bf16 amx_tile avx512_bf16", "AVX512", ("avx512_bf16", "amx_bf16")),
        ("avx512_vnni", "AVX512", ()),  # AVX512 without bf16 instructions
        ("avx512_bf16", "AVX2", ()),  # torch told not to use AVX512 (ATEN_CPU_CAPABILITY)
    ],
)
def test_cpu_bf16_flags_from_cpuinfo(tmp_path, monkeypatch, extra, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    cpu_bf16_flags.cache_clear()
    try:
        assert cpu_bf16_flags(str(path)) == expected
        assert cpu_bf16_flags(str(tmp_path / "missing")) == ()  # macOS, Windows
    finally:
        cpu_bf16_flags.cache_clear()


def test_auto_is_bf16_only_where_it_is_fast(monkeypatch):
    monkeypatch.setattr(perf, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert fast_bf16("cpu") and teacher_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(perf, "cpu_bf16_flags", lambda: ())
    assert not fast_bf16("cpu") and teacher_dtype("auto", torch.device("cpu")) is None
    assert not fast_bf16("meta")
    assert fast_bf16("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # explicit choices hold on any device; fp32 adds no autocast of its own
    assert teacher_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert teacher_dtype("fp16", torch.device("cpu")) == torch.float16
    assert teacher_dtype("fp32", torch.device("cpu")) is None


def test_unknown_teacher_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="teacher_precision"):
        Performance(teacher_precision="int8")


def _module(precision: str) -> DistillationModule:
    from kd_lightning.losses import CrossEntropy, FitNet, KLDivergence

    torch.manual_seed(0)
    return DistillationModule(
        student="mlp_tiny",
        teacher=TeacherSpec(model="lenet5", allow_untrained=True),
        heads=[
            CrossEntropy(0.1),
            KLDivergence(0.9),
            FitNet(1.0, student_layers=["features"], teacher_layers=["features"]),
        ],
        performance=Performance(teacher_precision=precision),
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_half_precision_teacher_reaches_the_heads_in_fp32(precision):
    half, full = _module(precision), _module("fp32")
    seen = []
    half.teacher.features.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = {"image": torch.randn(8, 1, 28, 28), "label": torch.arange(8) % 10}
    a, b = half.teacher_forward(batch).members[0], full.teacher_forward(batch).members[0]
    assert seen == [perf.TEACHER_DTYPES[precision]]  # the teacher did run at half precision
    assert a.logits.dtype == torch.float32 and a.features["features"].dtype == torch.float32
    assert not a.logits.is_inference()  # heads may save it for backward
    torch.testing.assert_close(a.logits, b.logits, rtol=0.05, atol=0.05)
    assert not torch.equal(a.logits, b.logits)
    loss, _ = half.compute_loss(
        half._student_taps(batch["image"]), half.teacher_forward(batch), batch
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
