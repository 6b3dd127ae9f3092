"""Measure models the same way, and write the comparison as Markdown, CSV and to W&B.

For each model: parameters (and how many are non-zero), the size of its saved
``state_dict`` on disk (and gzip-compressed, which is where unstructured sparsity pays
off), the median CPU latency over repeated forwards at each benchmark batch size (all
models timed round-robin), and test accuracy. Quantized modules keep their weights packed, so they are counted through
their ``weight()``/``bias()`` accessors.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.compress.quantize import quiet_ao
from kd_lightning.errors import ConfigError


def progress(iterable: Iterable[Any], desc: str, total: int | None = None, unit: str = "batch") -> Any:
    """A tqdm bar on stderr for one of compress's long passes (accuracy, calibration, timing,
    export): on ImageNet-sized data each takes minutes (issue 22)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=f"[compress] {desc}", total=total, unit=unit, leave=False,
                file=sys.stderr, dynamic_ncols=True)


@dataclass
class BenchmarkConfig:
    """How models are timed and scored.

    Args:
        batch_sizes: CPU latency is measured at each of these batch sizes.
        repeats: timed forwards per batch size; the report gives their median.
        warmup: untimed forwards first (allocator, oneDNN/fbgemm kernel selection).
        threads: intra-op CPU threads while timing (1 = per-core latency, reproducible
            on shared machines).
        max_test_batches: score accuracy on at most this many test batches (None: all).
    """

    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    repeats: int = 50
    warmup: int = 5
    threads: int = 1
    max_test_batches: int | None = None

    def check(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("benchmark.batch_sizes", self.batch_sizes, "give batch sizes >= 1, e.g. [1, 64]")
        for name in ("repeats", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"benchmark.{name}", getattr(self, name), "use 1 or more")
        if self.warmup < 0:
            raise ConfigError("benchmark.warmup", self.warmup, "use 0 or more")


@dataclass
class WandbConfig:
    """Log the report table to Weights & Biases.

    Args:
        enabled: off by default.
        project, name, group: the W&B run's project, name and group.
        mode: ``offline`` (default; ``wandb sync`` uploads later) never touches the
            network; ``online`` falls back to offline when the server is unreachable.
    """

    enabled: bool = False
    project: str = "kd-lightning"
    name: str | None = None
    group: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class ModelReport:
    """One row of the comparison."""

    model: str
    arch: str
    precision: str
    params: int
    nonzero_params: int
    size_mb: float
    gzip_mb: float
    latency_ms: dict[int, float]
    test_acc: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def flat(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if k != "latency_ms":
                row[k] = v
            if k == "nonzero_params":
                row["sparsity"] = round(self.sparsity, 4)
        for b, ms in self.latency_ms.items():
            row[f"latency_b{b}_ms"] = round(ms, 4)
        for k in ("size_mb", "gzip_mb", "test_acc"):
            row[k] = round(row[k], 4)
        return row


# -- measurements ---------------------------------------------------------------------------
def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), packed int8 weights included."""
    total = nonzero = 0
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if callable(weight) and not isinstance(weight, Tensor):  # torch.ao quantized module
            bias = m.bias() if callable(getattr(m, "bias", None)) else None
            tensors = [t for t in (weight(), bias) if t is not None]
        else:
            tensors = list(m.parameters(recurse=False))
        for t in tensors:
            t = t.dequantize() if t.is_quantized else t
            total += t.numel()
            nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def saved_size(model: nn.Module, path: Path) -> tuple[float, float]:
    """Save ``model.state_dict()`` to ``path``; (MB on disk, MB gzip-compressed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with quiet_ao():
        torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    path.write_bytes(data)
    return len(data) / 2**20, len(gzip.compress(data, compresslevel=6)) / 2**20


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved_latency(
    models: Sequence[nn.Module], input_shape: Sequence[int], bench: BenchmarkConfig
) -> list[dict[int, float]]:
    """Median forward time (ms) of each model at each benchmark batch size.

    The models are timed round-robin — one forward of each in turn, ``bench.repeats``
    times — on the same input, so load from other processes on a shared machine falls on
    all of them alike instead of on whichever model happened to run during a burst.
    """
    g = torch.Generator().manual_seed(0)
    results: list[dict[int, float]] = [{} for _ in models]
    bar = progress(None, f"timing {len(models)} models", len(bench.batch_sizes) * bench.repeats, "round")
    with cpu_threads(bench.threads), torch.inference_mode(), quiet_ao(), bar:
        for b in bench.batch_sizes:
            x = torch.randn(b, *input_shape, generator=g)
            for m in models:
                for _ in range(bench.warmup):
                    m(x)
            times: list[list[float]] = [[] for _ in models]
            bar.set_postfix(batch=b)
            for _ in range(bench.repeats):
                bar.update()  # between rounds, outside the timed forwards
                for i, m in enumerate(models):
                    start = time.perf_counter()
                    m(x)
                    times[i].append(time.perf_counter() - start)
            for i, t in enumerate(times):
                results[i][b] = statistics.median(t) * 1e3
    return results


def accuracy(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], max_batches: int | None = None,
    desc: str = "accuracy",
) -> float:
    """Top-1 accuracy over the labelled samples of ``batches`` (CPU)."""
    correct = total = 0
    try:
        size: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:  # an iterable-style loader
        size = None
    if max_batches is not None:
        size = max_batches if size is None else min(size, max_batches)
        batches = itertools.islice(batches, max_batches)
    with torch.inference_mode(), quiet_ao(), progress(batches, desc, size) as bar:
        for batch in bar:
            y = batch["label"]
            keep = y >= 0
            pred = model(batch["image"]).argmax(1)
            correct += int((pred[keep] == y[keep]).sum())
            total += int(keep.sum())
    return correct / total if total else float("nan")


def measure(
    label: str, model: nn.Module, precision: str, test_batches: Iterable[dict[str, Tensor]],
    bench: BenchmarkConfig, save_path: Path,
) -> ModelReport:
    """Every column of the report for one model (on CPU) but latency, which
    ``interleaved_latency`` measures for all models together."""
    model = model.cpu().eval()
    params, nonzero = count_params(model)
    size, gz = saved_size(model, save_path)
    acc = accuracy(model, test_batches, bench.max_test_batches, f"test accuracy: {label}")
    arch = getattr(model, "kd_name", type(model).__name__)
    return ModelReport(label, arch, precision, params, nonzero, size, gz, {}, acc)


# -- output ---------------------------------------------------------------------------------
COLUMN_TITLES = {
    "model": "model", "arch": "arch", "precision": "precision", "params": "params",
    "nonzero_params": "non-zero", "sparsity": "sparsity", "size_mb": "size (MB)",
    "gzip_mb": "gzip (MB)", "test_acc": "test acc",
}


def to_markdown(rows: Sequence[ModelReport]) -> str:
    """A GitHub-flavoured Markdown table of the rows."""
    flat = [r.flat() for r in rows]
    keys = [k for k in COLUMN_TITLES if k != "sparsity"] + [k for k in flat[0] if k.startswith("latency_b")]
    keys.insert(keys.index("nonzero_params") + 1, "sparsity")

    def title(k: str) -> str:
        if k.startswith("latency_b"):
            return f"latency b={k[len('latency_b'):-len('_ms')]} (ms)"
        return COLUMN_TITLES[k]

    def cell(k: str, v: Any) -> str:
        if k in ("params", "nonzero_params"):
            return f"{v:,}"
        if k in ("sparsity", "test_acc"):
            return f"{v:.1%}" if k == "sparsity" else f"{v:.4f}"
        if k in ("size_mb", "gzip_mb"):
            return f"{v:.3f}"
        if k.startswith("latency_b"):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(title(k) for k in keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in flat]
    return "\n".join(lines)


def write_csv(rows: Sequence[ModelReport], path: Path) -> Path:
    flat = [r.flat() for r in rows]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return path


def log_wandb(
    rows: Sequence[ModelReport], exports: Sequence[Any], cfg: WandbConfig, out_dir: Path,
    config: dict[str, Any],
) -> str | None:
    """Log the table (and one summary value per row and column) to a W&B run.

    Offline unless asked otherwise; an ``online`` request with no reachable server or no
    credentials falls back to offline, so this never blocks. Returns the run directory.
    """
    if not cfg.enabled or cfg.mode == "disabled":
        return None
    import wandb

    from kd_lightning.tracking_guard import has_credentials, reachable, wandb_endpoint

    mode = cfg.mode
    if mode == "online":
        host, port = wandb_endpoint()
        if not (has_credentials(host) and reachable(host, port)):
            import warnings

            warnings.warn(
                f"W&B server {host}:{port} unreachable or no API key: logging offline "
                f"(upload later with `wandb sync {out_dir / 'wandb'}`)", stacklevel=2,
            )
            mode = "offline"
    run = wandb.init(
        project=cfg.project, name=cfg.name, group=cfg.group, job_type="compress", mode=mode,
        dir=str(out_dir), config=config, reinit="finish_previous",
    )
    flat = [r.flat() for r in rows]
    run.log({"compress/report": wandb.Table(columns=list(flat[0]), data=[list(r.values()) for r in flat])})
    if exports:
        e_flat = [asdict(e) for e in exports]
        run.log({"compress/exports": wandb.Table(columns=list(e_flat[0]), data=[list(e.values()) for e in e_flat])})
    for r in flat:
        for k, v in r.items():
            if isinstance(v, (int, float)):
                run.summary[f"{r['model']}/{k}"] = v
    run_dir = run.dir
    run.finish()
    return run_dir
