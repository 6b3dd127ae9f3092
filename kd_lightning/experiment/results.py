"""From per-run records to the results table: mean ± std over seeds, gain over scratch.

Three accuracies are reported side by side, each labelled, because papers disagree on
which one to quote (RepDistiller #16, mdistiller #30):

* **best-val**: the test accuracy of the checkpoint whose *validation* accuracy was best
  (absent for runs without a validation split, ``val_fraction: 0``);
* **last**: the test accuracy of the final epoch's weights (what RepDistiller publishes);
* **best on test**: the best test accuracy over epochs (what mdistiller and KD-Zoo publish;
  optimistic, since test data picks the epoch), from runs with ``TestEveryEpoch``.

The first two never look at test accuracy to pick an epoch. A ``published`` number per row
(the experiment's ``published``) is shown beside ours. Standard deviations are sample
standard deviations (ddof=1) over seeds; with a single run they are left empty.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_lightning.machine import machine_line

#: what the causal-LM modules log at test (``test/<name>``; kd_lightning.modules.lm_distillation)
LM_METRIC_NAMES = (
    "nll", "ppl", "kl", "reverse_kl", "jsd", "rougeL", "teacher_nll", "teacher_rougeL",
    # bits per byte (byte-level BPE tokenizers): comparable across tokenizers
    "bpb", "teacher_bpb",
    # greedy completions: mean length, distinct-1/2, ExAccErr (modules/lm_eval_stats.py)
    "gen_len", "distinct_1", "distinct_2", "exposure_bias",
    "teacher_gen_len", "teacher_distinct_1", "teacher_distinct_2",
)
#: ... as the experiment records them (kd_lightning.experiment.runner._test_metrics)
LM_METRICS = tuple(f"test_{m}_best" for m in LM_METRIC_NAMES)

#: per-run metrics that are averaged over seeds (fractions in [0, 1], except KL in nats)
METRICS = (
    "test_acc_best", "test_acc_last", "test_acc_best_on_test",
    "agreement_best", "agreement_last",
    "test_ece_best", "test_ece_last",
    "test_acc_top5_best", "test_acc_top5_last",
    "kl_teacher_student_best",
    # causal-LM runs: held-out NLL (nats/token), KL(teacher ‖ student), ROUGE-L F
    *LM_METRICS,
)

#: the flat columns of results.csv, in order
CSV_COLUMNS = (
    "name", "kind", "n_seeds", "params",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
    "gain_best", "gain_last", "published",
)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the non-missing values; std is None for one value."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate(records: list[dict[str, Any]], order: Sequence[tuple[str, str]],
              published: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """One row per stage (``order`` = [(kind, name), …]) from the per-run records;
    ``published``: stage name → the published top-1 (%) the row reproduces."""
    rows = []
    for kind, name in order:
        runs = sorted((r for r in records if r["stage"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        row: dict[str, Any] = {
            "name": name, "kind": kind, "n_seeds": len(runs),
            "seeds": [r["seed"] for r in runs], "params": runs[0].get("params"),
            "published": (published or {}).get(name),
        }
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([r.get(m) for r in runs])
        row["per_seed"] = {m: [r.get(m) for r in runs]
                           for m in ("test_acc_best", "test_acc_last", "test_acc_best_on_test")}
        if any(r.get("test_nll_best") is not None for r in runs):  # causal LMs
            row["per_seed_nll"] = [r.get("test_nll_best") for r in runs]
        rows.append(row)
    scratch = next((r for r in rows if r["kind"] == "scratch"), None)
    for row in rows:
        for which in ("best", "last"):
            ours, ref = row[f"test_acc_{which}_mean"], scratch and scratch[f"test_acc_{which}_mean"]
            row[f"gain_{which}"] = (
                ours - ref if row["kind"] == "kd" and ours is not None and ref is not None else None
            )
    return rows


def write_results(rows: list[dict[str, Any]], records: list[dict[str, Any]], out_dir: Path,
                  meta: dict[str, Any]) -> dict[str, Path]:
    """results.csv (flat), results.json (rows + every run), results.md (tables + legend)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"results.{k}" for k in ("csv", "json", "md")}
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows, "runs": records}, indent=2) + "\n")
    paths["md"].write_text(markdown_table(rows, meta))
    return paths


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """The content of an experiment's ``results.json`` (``meta``, ``rows``, ``runs``)."""
    return json.loads((Path(out_dir) / "results.json").read_text())


# -- formatting -----------------------------------------------------------------------------
def _pct(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "—"
    if std is None:
        return f"{100 * mean:.{digits}f}"
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"


def _gain(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.2f}"


def _params(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


TABLE_HEADER = (
    "row", "kind", "test acc, best-val ckpt (%)", "test acc, last epoch (%)",
    "Δ scratch best (pp)", "Δ scratch last (pp)",
    "test acc, best epoch on test (%; as mdistiller/KD-Zoo report it; optimistic)",
    "published (%)", "agreement w/ teacher (%)", "ECE (%)", "params", "seeds",
)


def table_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["name"], r["kind"],
            _pct(r["test_acc_best_mean"], r["test_acc_best_std"]),
            _pct(r["test_acc_last_mean"], r["test_acc_last_std"]),
            _gain(r["gain_best"]), _gain(r["gain_last"]),
            _pct(r.get("test_acc_best_on_test_mean"), r.get("test_acc_best_on_test_std")),
            "—" if r.get("published") is None else f"{r['published']:.2f}",
            _pct(r["agreement_best_mean"], r["agreement_best_std"]) if r["kind"] != "teacher" else "—",
            _pct(r["test_ece_best_mean"], r["test_ece_best_std"]),
            _params(r["params"]), str(r["n_seeds"]),
        ]
        for r in rows
    ]


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    meta = meta or {}
    lines = []
    if meta.get("name"):
        lines += [f"### Experiment `{meta['name']}`", ""]
    if meta.get("git_commit"):  # where the numbers came from, so the file can be reproduced
        dirty = " (with uncommitted changes)" if meta.get("git_dirty") else ""
        lines += [f"- command: `{meta.get('command', '')}`",
                  f"- commit: {meta['git_commit']}{dirty}; resolved config sha256: "
                  f"{str(meta.get('resolved_config_sha256', ''))[:16]}",
                  f"- machine: {machine_line(meta['machine']) if meta.get('machine') else 'not recorded'}"
                  f"; date: {meta.get('date', '')}", ""]
    if lm_only(rows):  # causal LMs: no accuracies to show, the LM table and its seeds only
        lines += lm_table(rows)[1:]
        if meta.get("seeds") is not None:
            lines.append(f"- student seeds: {meta['seeds']}; the teacher is one run.")
        lines += lm_per_seed(rows)
        return "\n".join(lines) + "\n"
    lines += ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    lines += [
        "",
        "- **best-val ckpt**: test accuracy of the epoch with the best *validation* accuracy "
        "(— without a validation split); **last epoch**: test accuracy after the final epoch "
        "(as RepDistiller reports it). Neither lets test data pick an epoch.",
        "- **best epoch on test**: the best test accuracy over all epochs, as mdistiller/KD-Zoo "
        "report it; optimistic (test data picks the epoch).",
        "- mean ± sample std (ddof=1) over seeds; Δ = KD mean − scratch mean, in percentage points.",
        "- agreement = share of test images where the student's top-1 equals the teacher's; "
        "ECE = 15-bin expected calibration error; both for the best-val checkpoint (the last "
        "epoch's weights without a validation split).",
    ]
    lines += lm_table(rows)
    if meta.get("published_source"):
        lines.append(f"- **published**: {meta['published_source']}")
    if meta.get("seeds") is not None:
        lines.append(f"- student seeds: {meta['seeds']}; the teacher is one run.")
    students = [r for r in rows if r["kind"] != "teacher"]
    if students and max(r["n_seeds"] for r in students) > 1:
        keys = ["test_acc_best", "test_acc_last"]
        if any(v is not None for r in students for v in r["per_seed"].get("test_acc_best_on_test", [])):
            keys.append("test_acc_best_on_test")
        names = {"test_acc_best": "best-val", "test_acc_last": "last",
                 "test_acc_best_on_test": "best on test"}
        lines += ["", f"Per-seed test accuracy (%), {' / '.join(names[k] for k in keys)}:", ""]
        seeds = sorted({s for r in students for s in r["seeds"]})
        lines += ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for r in students:
            by_seed = {s: [r["per_seed"].get(k, [None] * len(r["seeds"]))[i] for k in keys]
                       for i, s in enumerate(r["seeds"])}
            cells = []
            for s in seeds:
                values = by_seed.get(s, [None] * len(keys))
                while len(values) > 1 and values[-1] is None:  # e.g. a reused teacher's "last"
                    values = values[:-1]
                cells.append("—" if all(v is None for v in values) else
                             " / ".join("—" if v is None else f"{100 * v:.2f}" for v in values))
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LM_HEADER = ("row", "kind", "NLL (nats/token)", "ppl", "bits/byte", "KL(teacher ‖ student)",
             "reverse KL", "ROUGE-L F (%)", "gen. length (tokens)", "distinct-1 (%)",
             "distinct-2 (%)", "ExAccErr (%)", "params", "seeds")


def lm_only(rows: list[dict[str, Any]]) -> bool:
    """Every row a causal-LM run (NLL recorded, no accuracy)."""
    return bool(rows) and all(
        r.get("test_nll_best_mean") is not None and r.get("test_acc_best_mean") is None
        and r.get("test_acc_last_mean") is None for r in rows
    )


def _lm_cell(r: dict[str, Any], m: str, scale: float = 1.0, digits: int = 3) -> str:
    mean, std = r.get(f"test_{m}_best_mean"), r.get(f"test_{m}_best_std")
    if mean is None:
        return "—"
    return f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")


def lm_table(rows: list[dict[str, Any]]) -> list[str]:
    """The causal-LM rows (held-out, best-val checkpoint), mean ± std over seeds."""
    lm = [r for r in rows if r.get("test_nll_best_mean") is not None]
    if not lm:
        return []
    cell = _lm_cell
    out = ["", "Causal LM, held-out completions (best-val checkpoint; KL against the "
           "experiment's teacher, teacher entropy included):", "",
           "| " + " | ".join(LM_HEADER) + " |", "|" + "---|" * len(LM_HEADER)]
    for r in lm:
        out.append("| " + " | ".join([
            r["name"], r["kind"], cell(r, "nll"), cell(r, "ppl", digits=1), cell(r, "bpb"),
            cell(r, "kl"),
            cell(r, "reverse_kl"), cell(r, "rougeL", 100, 2), cell(r, "gen_len", digits=1),
            cell(r, "distinct_1", 100, 1), cell(r, "distinct_2", 100, 1),
            cell(r, "exposure_bias", digits=1), _params(r.get("params")),
            str(r["n_seeds"])]) + " |")
    out += [
        "",
        "- NLL: mean cross-entropy per completion token of the held-out split (ppl = exp NLL), "
        "in each row's own tokens; bits/byte: the same sum per UTF-8 byte of the completions, "
        "in log base 2 (EOS included, 0 bytes), which compares across tokenizers. "
        "KL(teacher ‖ student) and reverse KL per token against the experiment's teacher.",
        "- ROUGE-L F, generation length (tokens before EOS) and distinct-1/2 (distinct word "
        "n-grams / all n-grams over every completion; Li et al. 2016) are of greedy "
        "completions of the first held-out prompts. ExAccErr (Arora et al. 2022; the teacher "
        "is the oracle) is the excess, in %, of the per-step KL accumulated on the student's "
        "own greedy prefixes over the per-step KL on the teacher's "
        "(kd_lightning/modules/lm_eval_stats.py). Rows without a teacher have no KL or ExAccErr.",
    ]
    return out


def lm_per_seed(rows: list[dict[str, Any]]) -> list[str]:
    """Per-seed held-out NLL of the student rows (from ``per_seed``), when seeds > 1."""
    students = [r for r in rows if r["kind"] != "teacher" and r.get("per_seed_nll")]
    if not students or max(r["n_seeds"] for r in students) < 2:
        return []
    seeds = sorted({s for r in students for s in r["seeds"]})
    out = ["", "Per-seed held-out NLL (nats/token), best-val checkpoint:", "",
           "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|" + "---|" * len(seeds)]
    for r in students:
        by_seed = dict(zip(r["seeds"], r["per_seed_nll"], strict=True))
        out.append(f"| {r['name']} | " + " | ".join(
            "—" if by_seed.get(s) is None else f"{by_seed[s]:.3f}" for s in seeds) + " |")
    return out


def text_table(rows: list[dict[str, Any]]) -> str:
    """The results table for the terminal (fixed-width columns)."""
    if lm_only(rows):
        return "\n".join(lm_table(rows)[1:])
    cells = [list(TABLE_HEADER), *table_cells(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out + lm_table(rows))
