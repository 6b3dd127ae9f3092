"""``kd-lightning compress``: distilled student → pruned → KD fine-tuned → int8 → exported.

Takes a distilled student checkpoint (a DistillationModule's, or a ClassifierModule's
with an explicit ``teacher``) through

1. pruning (``prune.method``: global unstructured or structured by channel),
2. a KD fine-tune from the same teacher(s) with the pruning masks held fixed, made
   permanent afterwards,
3. post-training int8 quantization for CPU (dynamic and/or FX static, calibrated on
   training batches),
4. export of the final fp32 student to ONNX (checked with onnxruntime) and
   ``torch.export``, and of the int8 student to TorchScript (checked against PyTorch),

then measures teacher, student, pruned and quantized students the same way and writes
``report.md``, ``report.csv`` and ``report.json`` (plus W&B when ``wandb.enabled``)::

    kd-lightning compress -c configs/compress/mnist.yaml
    kd-lightning compress -c configs/compress/mnist.yaml --prune.method=ln_structured --prune.amount=0.3
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.compress.export import (
    ExportCheck,
    ExportConfig,
    compare,
    export_onnx,
    export_program,
    export_torchscript,
    onnx_runner,
    program_runner,
    torchscript_runner,
)
from kd_lightning.compress.prune import (
    FinetuneConfig,
    PruneConfig,
    check_amount,
    kd_finetune,
    prune_model,
)
from kd_lightning.compress.quantize import QuantizeConfig, quantize_dynamic, quantize_static
from kd_lightning.compress.report import (
    BenchmarkConfig,
    ModelReport,
    WandbConfig,
    interleaved_latency,
    log_wandb,
    measure,
    progress,
    to_markdown,
    write_csv,
)
from kd_lightning.errors import ConfigError
from kd_lightning.machine import cpu_model
from kd_lightning.models import create_model
from kd_lightning.modules.teacher import TeacherSpec, build_teacher, refuse_untrained
from kd_lightning.preflight import parse_or_config_error


@dataclass
class StudentSource:
    """What a student checkpoint holds: architecture, weights and (for KD) its teachers."""

    name: str
    kwargs: dict[str, Any]
    state: dict[str, torch.Tensor]
    num_classes: int
    input_shape: tuple[int, int, int]
    teachers: list[TeacherSpec] | None


@dataclass
class CompressResult:
    rows: list[ModelReport]
    exports: list[ExportCheck]
    files: dict[str, str] = field(default_factory=dict)

    def row(self, model: str) -> ModelReport:
        return next(r for r in self.rows if r.model == model)


def load_student(checkpoint: str) -> StudentSource:
    """Read a DistillationModule (``student.*``) or ClassifierModule (``model.*``) checkpoint."""
    ckpt = read_checkpoint(checkpoint, "checkpoint", "distil a student first (kd-lightning fit)")
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "student" in hp:
        name, kwargs, prefix = hp["student"], hp.get("student_kwargs"), "student."
        teachers = hp.get("teacher")
        teachers = [_as_spec(t) for t in (teachers if isinstance(teachers, list) else [teachers])] if teachers else None
    elif "model" in hp:
        name, kwargs, prefix, teachers = hp["model"], hp.get("model_kwargs"), "model.", None
    else:
        raise ConfigError(
            "checkpoint", checkpoint,
            "not a kd-lightning DistillationModule or ClassifierModule checkpoint (no model name "
            "in its hyper_parameters)",
        )
    shape = tuple(int(s) for s in hp.get("input_shape", (1, 28, 28)))
    if len(shape) != 3 or hp.get("vocab_sizes"):  # a text student: (max_length,) token ids
        raise ConfigError(
            "checkpoint", checkpoint,
            f"its student {name!r} reads token ids (input_shape={list(shape)}), and compress "
            "handles image students (input_shape [C, H, W]) only",
        )
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return StudentSource(
        name, dict(kwargs or {}), state, int(hp.get("num_classes", 10)),
        tuple(int(s) for s in hp.get("input_shape", (1, 28, 28))), teachers,
    )


def _as_spec(t: Any) -> TeacherSpec:
    if isinstance(t, TeacherSpec):
        return t
    if not isinstance(t, dict):
        t = vars(t)  # a jsonargparse Namespace
    names = {f.name for f in dataclasses.fields(TeacherSpec)}
    return TeacherSpec(**{k: v for k, v in t.items() if k in names})


def _check(prune: PruneConfig, finetune: FinetuneConfig, quantize: QuantizeConfig, bench: BenchmarkConfig) -> None:
    """Every config error before any model is built or trained."""
    if prune.method != "none":
        check_amount(prune.amount)
    if prune.norm <= 0:
        raise ConfigError("prune.norm", prune.norm, "use a norm > 0 (1 or 2)")
    if finetune.max_epochs < 0:
        raise ConfigError("finetune.max_epochs", finetune.max_epochs, "use 0 (no fine-tune) or more")
    if finetune.lr <= 0:
        raise ConfigError("finetune.lr", finetune.lr, "use a learning rate > 0, e.g. 5e-4")
    engines = torch.backends.quantized.supported_engines
    if (quantize.dynamic or quantize.static) and quantize.backend not in engines:
        raise ConfigError(
            "quantize.backend", quantize.backend, f"this PyTorch build supports {[e for e in engines if e != 'none']}"
        )
    if quantize.static and quantize.calibration_batches < 1:
        raise ConfigError("quantize.calibration_batches", quantize.calibration_batches, "use 1 or more (e.g. 16)")
    bench.check()


def compress(
    checkpoint: str,
    data: L.LightningDataModule,
    teacher: TeacherSpec | list[TeacherSpec] | None = None,
    output_dir: str = "runs/compress",
    seed: int = 0,
    prune: PruneConfig = PruneConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
    quantize: QuantizeConfig = QuantizeConfig(),
    export: ExportConfig = ExportConfig(),
    benchmark: BenchmarkConfig = BenchmarkConfig(),
    wandb: WandbConfig = WandbConfig(),
    config: dict[str, Any] | None = None,
) -> CompressResult:
    """Run the pipeline and write the report.

    Args:
        checkpoint: the distilled student (``.ckpt`` of a DistillationModule or ClassifierModule).
        data: the DataModule: training batches for the fine-tune and calibration, the test
            split for accuracy.
        teacher: teacher(s) for the KD fine-tune and the report; default: the ones the
            checkpoint was distilled from.
        output_dir: where models, artifacts, logs and the report go.
        seed: seeds the fine-tune.
        prune, finetune, quantize, export, benchmark, wandb: see their classes.
        config: the resolved configuration, saved with the W&B run (set by the CLI).
    """
    _check(prune, finetune, quantize, benchmark)
    out = Path(output_dir)
    src = load_student(checkpoint)
    specs = (teacher if isinstance(teacher, list) else [teacher]) if teacher else src.teachers
    if not specs:
        raise ConfigError(
            "teacher", teacher,
            "the checkpoint is not a KD run's, so it names no teacher: give teacher: {checkpoint: ...}",
        )
    fields = ["teacher"] if len(specs) == 1 else [f"teacher[{i}]" for i in range(len(specs))]
    teachers = [build_teacher(s, src.num_classes, src.input_shape[0], f) for s, f in zip(specs, fields)]
    for t in teachers:  # fine-tuning towards a random network is no compression (issue 21)
        refuse_untrained(t)
    (out / "models").mkdir(parents=True, exist_ok=True)
    student = create_model(src.name, src.num_classes, src.input_shape[0], field="checkpoint", **src.kwargs)
    student.load_state_dict(src.state)
    student.eval()
    if quantize.static:  # fail now, not after the fine-tune, if FX cannot trace the student
        try:
            torch.fx.symbolic_trace(student)
        except Exception as err:
            raise ConfigError(
                "quantize.static", True,
                f"torch.fx cannot trace {src.name!r} ({type(err).__name__}: {err}); set "
                "quantize.static=false and use quantize.dynamic",
            ) from None

    L.seed_everything(seed, verbose=False)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    test_loader = data.test_dataloader()

    measured: list[nn.Module] = []  # timed together at the end

    def row(label: str, model: nn.Module, precision: str = "fp32") -> ModelReport:
        report = measure(label, model, precision, test_loader, benchmark, out / "models" / f"{label}.pt")
        measured.append(model)
        rank_zero_info(f"[compress] {label}: test acc {report.test_acc:.4f}, {report.nonzero_params:,} non-zero params")
        return report

    rows = [row("teacher" if len(teachers) == 1 else f"teacher{i}", t) for i, t in enumerate(teachers)]
    rows.append(row("student", student))

    final = student
    if prune.method != "none":
        prune_fn = functools.partial(
            prune_model, method=prune.method, amount=prune.amount, norm=prune.norm,
            include_classifier=prune.include_classifier,
        )
        before, final = kd_finetune(
            src.name, src.kwargs, src.state, specs, data, src.num_classes, src.input_shape,
            finetune, out, prune_fn=prune_fn,
        )
        rows.append(row("pruned", before))
        if finetune.max_epochs > 0:
            rows.append(row("pruned_kd", final))
    elif finetune.max_epochs > 0:
        rank_zero_info("[compress] prune.method=none: no pruning, so no fine-tune either")

    static_model = None
    if quantize.dynamic:
        rows.append(row("int8_dynamic", quantize_dynamic(final, quantize.backend), "int8 dynamic"))
    if quantize.static:
        batches = itertools.islice(data.train_dataloader(), quantize.calibration_batches)
        calibration = [b["image"] for b in progress(batches, "calibration", quantize.calibration_batches)]
        static_model = quantize_static(final, calibration, quantize.backend)
        rows.append(row("int8_static", static_model, "int8 static"))

    rank_zero_info(f"[compress] timing {len(measured)} models at batch sizes {benchmark.batch_sizes}")
    for report, latency in zip(rows, interleaved_latency(measured, src.input_shape, benchmark)):
        report.latency_ms = latency
    exports = _export(final, static_model, test_loader, export, out / "export")

    files = _write(rows, exports, out, src, checkpoint, benchmark, quantize, prune, finetune)
    run_dir = log_wandb(rows, exports, wandb, out, config or {})
    if run_dir:
        files["wandb"] = run_dir
    rank_zero_info("\n" + to_markdown(rows))
    return CompressResult(rows, exports, files)


def _export(
    final: nn.Module, static_model: nn.Module | None, test_loader, cfg: ExportConfig, out: Path
) -> list[ExportCheck]:
    """Write the artifacts and check each against the model it came from."""
    batch = next(iter(test_loader))["image"]
    inputs = [batch[:1], batch[:64]]  # two batch sizes: the batch dimension must be dynamic
    example = batch[:2]
    name = getattr(final, "kd_name", "student")
    jobs = []
    if cfg.onnx:
        jobs.append(("onnx", final, export_onnx, onnx_runner, out / f"{name}.onnx", {"opset": cfg.opset}))
    if cfg.torch_export:
        jobs.append(("torch.export", final, export_program, program_runner, out / f"{name}.pt2", {}))
    if cfg.torchscript_int8 and static_model is not None:
        jobs.append(("torchscript", static_model, export_torchscript, torchscript_runner,
                     out / f"{name}_int8.torchscript.pt", {}))
    checks = []
    for fmt, model, write, runner, path, kwargs in progress(jobs, "export", len(jobs), "file"):
        write(model, example, path, **kwargs)
        diff, ok = compare(runner(path), model, inputs, cfg.atol, cfg.rtol)
        label = "int8_static" if model is static_model else "final_fp32"
        checks.append(ExportCheck(label, fmt, str(path), path.stat().st_size / 2**20, diff, ok))
        rank_zero_info(f"[compress] {fmt}: {path} (max |Δ| vs PyTorch {diff:.2e}, {'ok' if ok else 'MISMATCH'})")
        if not ok and cfg.fail_on_mismatch:
            raise RuntimeError(
                f"the {fmt} export of {label} differs from PyTorch by up to {diff:.3e} "
                f"(atol={cfg.atol}, rtol={cfg.rtol}); artifact kept at {path}. Set "
                "export.fail_on_mismatch=false to keep going."
            )
    return checks


def _write(
    rows: list[ModelReport], exports: list[ExportCheck], out: Path, src: StudentSource, checkpoint: str,
    bench: BenchmarkConfig, quantize: QuantizeConfig, prune: PruneConfig, finetune: FinetuneConfig,
) -> dict[str, str]:
    env = (
        f"CPU: {cpu_model()}; torch {torch.__version__}, {bench.threads} thread(s), int8 backend "
        f"{quantize.backend}; latency = median of {bench.repeats} forwards after {bench.warmup} warm-up, "
        "all models timed round-robin"
    )
    steps = f"prune: {prune.method}" + (f" {prune.amount:.0%}" if prune.method != "none" else "")
    if prune.method != "none":
        steps += f", then KD fine-tune {finetune.max_epochs} epoch(s) at lr {finetune.lr}"
    md = [
        f"# Compression report: {src.name}",
        "",
        f"Student checkpoint: `{checkpoint}`. {steps}; int8 models quantize the final fp32 student.",
        "",
        "Rows: `pruned` = right after pruning, `pruned_kd` = after the KD fine-tune, "
        "`int8_*` = post-training quantization of the final fp32 student.",
        "",
        to_markdown(rows),
        "",
        env,
    ]
    if exports:
        md += ["", "## Exports", "", "| model | format | file | size (MB) | max abs diff vs PyTorch | ok |",
               "|---|---|---|---|---|---|"]
        md += [f"| {e.model} | {e.format} | `{Path(e.path).name}` | {e.size_mb:.3f} | {e.max_abs_diff:.2e} | "
               f"{'yes' if e.ok else 'NO'} |" for e in exports]
    files = {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "json": str(out / "report.json")}
    Path(files["markdown"]).write_text("\n".join(md) + "\n")
    write_csv(rows, Path(files["csv"]))
    Path(files["json"]).write_text(json.dumps({
        "checkpoint": checkpoint, "environment": env, "rows": [r.flat() for r in rows],
        "exports": [dataclasses.asdict(e) for e in exports],
    }, indent=2))
    return files


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="kd-lightning compress",
        description="Prune, KD-fine-tune, quantize and export a distilled student; write a report.",
        exit_on_error=False,  # main() turns a failed parse into one ConfigError line
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config (configs/compress/)")
    parser.add_function_arguments(compress, as_group=False, skip={"config"})
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace an earlier run's output_dir (refused otherwise)")
    return parser


def main(argv: list[str] | None = None) -> CompressResult:
    """``kd-lightning compress [-c config.yaml] [--field=value ...]``."""
    parser = build_parser()
    cfg = parse_or_config_error(parser, list(sys.argv[1:] if argv is None else argv), "compress",
                                compress)
    resolved = cfg.clone()
    del resolved["config"], resolved["overwrite"]
    overwrite = bool(cfg.pop("overwrite"))
    init = parser.instantiate_classes(cfg)
    names = [n for n in inspect.signature(compress).parameters if n != "config"]
    kwargs = {n: init[n] for n in names}
    out = Path(kwargs["output_dir"])
    # an earlier run's models and report would be replaced, or mixed with this run's
    if (out / "config.yaml").exists() or (out / "models").is_dir() and any((out / "models").iterdir()):
        if not overwrite:
            raise ConfigError("output_dir", str(out), "holds an earlier compress run: pass --overwrite=true "
                              "to replace it, or give a new output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(parser.dump(resolved, skip_none=False))
    return compress(**kwargs, config=resolved.as_dict())
