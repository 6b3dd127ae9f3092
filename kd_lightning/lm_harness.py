"""``kd-lightning lm-eval``: EleutherAI's lm-evaluation-harness on a kd-lightning LM checkpoint.

The student of an ``LMDistillationModule`` checkpoint (or the decoder of a ``CausalLMModule``
one, e.g. the quickstart teacher) is rebuilt from the checkpoint's hyper-parameters and
weights, with the tokenizer its data used, and evaluated by ``lm_eval.simple_evaluate`` as an
``HFLM`` (a pre-initialised ``PreTrainedModel`` + tokenizer)::

    kd-lightning lm-eval --ckpt runs/llm/quickstart/kd/best.ckpt \\
        --tasks movie_reviews_completion,movie_reviews_choice --limit 64

Tasks come from ``configs/lm_eval`` (local tasks on the bundled movie-review corpus; their
data file is written when missing, or by ``--write-task-data``), from ``--include-path``
folders of task YAMLs, or from lm-eval's own catalogue. The command runs offline
(``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``), so a catalogue task whose data set is not in
the local Hugging Face cache is refused in one line instead of waiting on the network
(``--online`` lifts this). The result JSON holds each task's metrics, the sample counts, the
checkpoint's sha256 and the provenance (command, commit, task files, machine).

The tokenizer: ``--tokenizer DIR``, else the ``hf:`` student's own folder, else the folder
under ``data/`` (of the working directory) whose vocabulary matches the digest the
checkpoint recorded (every LM data module stores it); a mismatch is refused.

lm-eval is an optional extra (``pip install "kd-lightning[eval]"``), imported only here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd_lightning.errors import ConfigError, OneLineArgumentParser, closest
from kd_lightning.provenance import REPO, provenance

#: the bundled task folder (in a checkout) and the data file its tasks read
TASKS_DIR = REPO / "configs" / "lm_eval"
TASK_DATA = Path("data/lm_eval/movie_reviews_test.jsonl")
BUNDLED_TASKS = ("movie_reviews_completion", "movie_reviews_choice", "movie_reviews")


def default_include() -> list[str]:
    """The bundled task folder, where this is a checkout (an installed wheel has none)."""
    return [str(TASKS_DIR)] if TASKS_DIR.is_dir() else []


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="kd-lightning lm-eval",
        description="Run lm-eval tasks on the student of a kd-lightning LM checkpoint.",
    )
    p.add_argument("--ckpt", help="an LMDistillationModule or CausalLMModule checkpoint")
    p.add_argument("--tasks", help="comma-separated lm-eval task, group or tag names")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of lm-eval task YAMLs (repeatable); configs/lm_eval is always included",
    )
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="examples per task (< 1: a fraction); for quick checks only",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100,
        help="bootstrap resamples for the stderr of non-mean metrics (0: none)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if any)")
    p.add_argument("--tokenizer", default=None, help="the tokenizer folder the run's data used")
    p.add_argument(
        "--output", default=None, help="result JSON (default: <ckpt dir>/<ckpt name>.lm_eval.json)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument(
        "--online",
        action="store_true",
        help="let lm-eval's catalogue tasks download their data sets",
    )
    p.add_argument(
        "--write-task-data",
        nargs="?",
        const=str(TASK_DATA),
        default=None,
        metavar="FILE",
        help=f"write the movie-review task data (default {TASK_DATA})",
    )
    p.add_argument("--seed", type=int, default=0, help="the movie-review data's film split seed")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """Entry of ``kd-lightning lm-eval``: returns the result record (or the number of task
    rows written by ``--write-task-data`` alone); bad input is a one-line ``ConfigError``."""
    args = _parser().parse_args(argv)
    if args.write_task_data is not None:
        rows = write_task_data(args.write_task_data, seed=args.seed)
        print(f"kd-lightning lm-eval: wrote {rows} rows to {args.write_task_data}")
        if not args.ckpt and not args.tasks:
            return rows
    if not args.ckpt:
        raise ConfigError("--ckpt", None, "give the checkpoint to evaluate")
    if not args.tasks:
        raise ConfigError("--tasks", None, f"give task names, e.g. {','.join(BUNDLED_TASKS[:2])}")
    return run(args, ["kd-lightning", "lm-eval", *(argv or [])])


# -- the local task's data ------------------------------------------------------------------------
def write_task_data(
    path: str | Path = TASK_DATA,
    seed: int = 0,
    val_films: int = 12,
    test_films: int = 12,
    plot_chars: int = 160,
    n_choices: int = 4,
) -> int:
    """The test films of ``MovieReviewsLMDataModule`` (same split; the quickstart's settings
    by default) as JSON lines: ``prompt`` (the data module's), ``completion`` (one critic
    review), ``choices`` (it and ``n_choices - 1`` reviews of other test films, seeded) and
    ``label`` (its position). Written atomically; returns the row count."""
    from kd_lightning.data.lm import INSTRUCTION, MovieReviewsLMDataModule

    films = list(MovieReviewsLMDataModule.read_films())
    random.Random(seed).shuffle(films)  # MovieReviewsLMDataModule._split_films's split
    test = films[val_films : val_films + test_films]
    rows = []
    for f, (film, plot, reviews) in enumerate(test):
        others = [r for g, (_, _, revs) in enumerate(test) if g != f for r in revs]
        for i, review in enumerate(reviews):
            rng = random.Random(f"{seed}-{film}-{i}")
            choices = [review, *rng.sample(others, min(n_choices - 1, len(others)))]
            rng.shuffle(choices)
            rows.append(
                {
                    "film": film,
                    "prompt": f"{INSTRUCTION}\nPlot: {plot[:plot_chars]}\nReview:",
                    "completion": review,
                    "choices": choices,
                    "label": choices.index(review),
                }
            )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tmp.replace(out)
    return len(rows)


# -- the student -------------------------------------------------------------------------------
def load_student(path: str | Path, field: str = "--ckpt") -> tuple[Any, dict[str, Any]]:
    """The evaluated decoder (a ``PreTrainedModel``, eval mode, CPU) of a kd-lightning LM
    checkpoint, and what the result records about it. LoRA checkpoints (adapters only) are
    rebuilt by ``LMDistillationModule.load_from_checkpoint`` and merged."""
    from kd_lightning.checkpoints import read_checkpoint
    from kd_lightning.models.lm import build_causal_lm
    from kd_lightning.modules.lm_distillation import _check_vocab

    ckpt = read_checkpoint(path, field, "train the model first (kd-lightning fit)", mmap=True)
    hp = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    if "student" in hp:
        prefix, name, kwargs = "student.", hp["student"], hp.get("student_kwargs")
    elif "model" in hp and isinstance(hp["model"], str):
        prefix, name, kwargs = "model.", hp["model"], hp.get("model_kwargs")
    else:
        raise ConfigError(
            field,
            str(path),
            "not an LMDistillationModule or CausalLMModule "
            "checkpoint (no student/model in its hyper-parameters)",
        )
    vocab = _check_vocab(int(hp.get("num_classes", 0)), hp.get("vocab_sizes"))
    if ckpt.get("kd_lora_base") is not None:
        from kd_lightning.modules.lm_distillation import LMDistillationModule

        module = LMDistillationModule.load_from_checkpoint(
            path, map_location="cpu", weights_only=False
        )
        model = module.student.merge_and_unload()
    else:
        model = build_causal_lm(name, vocab, kwargs, field)
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                field,
                str(path),
                "its weights do not fit the model its "
                f"hyper-parameters name: {str(err).splitlines()[1:2]}",
            ) from None
    if model.get_input_embeddings().num_embeddings > vocab:
        model.resize_token_embeddings(vocab)  # a padded table: score the real vocabulary only
    digest = next(
        (
            v["tokenizer_digest"]
            for v in ckpt.values()
            if isinstance(v, dict) and isinstance(v.get("tokenizer_digest"), str)
        ),
        ckpt.get("kd_lm_tokenizer"),
    )
    info = {
        "path": str(path),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "module": str(hp.get("_class_path", "")).rpartition(".")[2] or None,
        "model": name,
        "model_kwargs": kwargs,
        "vocab_size": vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_digest": digest,
        "global_step": ckpt.get("global_step"),
    }
    return model.eval(), info


def find_tokenizer(
    info: dict[str, Any], given: str | None, field: str = "--tokenizer"
) -> tuple[Any, str]:
    """(tokenizer, folder) of the checkpoint's data: ``given``, the ``hf:`` model's folder, or
    the folder under ``data/`` whose vocabulary has the recorded digest."""
    from transformers import AutoTokenizer

    from kd_lightning.data.lm import tokenizer_digest

    want = info.get("tokenizer_digest")
    if given:
        try:
            tok = AutoTokenizer.from_pretrained(given)
        except (OSError, ValueError) as err:
            raise ConfigError(field, given, str(err).splitlines()[0]) from None
        if want and tokenizer_digest(tok) != want:
            raise ConfigError(
                field,
                given,
                f"its vocabulary is not the checkpoint's (digest "
                f"{tokenizer_digest(tok)} vs {want}): give the run's tokenizer",
            )
        return tok, given
    candidates = []
    if str(info["model"]).startswith("hf:"):
        candidates.append(Path(info["model"][3:]))
    if Path("data").is_dir():
        candidates += sorted(p.parent for p in Path("data").glob("**/tokenizer.json"))
    for folder in candidates[:64]:
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError):
            continue
        if want is None or tokenizer_digest(tok) == want:
            return tok, str(folder)
    raise ConfigError(
        field,
        None,
        f"no tokenizer folder under data/ has the checkpoint's "
        f"vocabulary (digest {want}): give the folder the run's data used, e.g. "
        "--tokenizer data/llm/quickstart/bpe-1024-seed0",
    )


# -- lm-eval --------------------------------------------------------------------------------------
@contextlib.contextmanager
def offline(on: bool = True) -> Iterator[None]:
    """Hugging Face Hub and datasets offline for the block (environment and the flags the
    libraries read at import), so a task whose data set is not cached fails at once."""
    if not on:
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flags = [
        (hub, "HF_HUB_OFFLINE"),
        (ds_config, "HF_HUB_OFFLINE"),
        (ds_config, "HF_DATASETS_OFFLINE"),
    ]
    saved = [getattr(m, a) for m, a in flags]
    os.environ.update({k: "1" for k in env})
    for m, a in flags:
        setattr(m, a, True)
    try:
        yield
    finally:
        for (m, a), v in zip(flags, saved):
            setattr(m, a, v)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_CATALOGUE: dict[tuple[str, ...], Any] = {}


_NAME = re.compile(rb"^\s*(?:task|group|tag)\s*:\s*([A-Za-z0-9_.\-]+)\s*$", re.MULTILINE)


def catalogue_scan(names: list[str]) -> tuple[set[str], set[str]]:
    """(the names some YAML of lm-eval's catalogue mentions, the catalogue's ``task:``/
    ``group:``/``tag:`` names): a text scan, ~1 s where indexing takes ~12 s. A name no
    catalogue file mentions is no catalogue task."""
    import lm_eval.tasks

    words = {n: re.compile(rb"\b" + re.escape(n.encode()) + rb"\b") for n in names}
    mentioned: set[str] = set()
    found: set[str] = set()
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"):
        text = path.read_bytes()
        found.update(m.decode() for m in _NAME.findall(text))
        mentioned.update(n for n, w in words.items() if n not in mentioned and w.search(text))
    return mentioned, found


def task_manager(names: list[str], include: list[str]) -> tuple[Any, set[str]]:
    """A ``TaskManager`` that knows every name, and the names the local folders hold: the
    local folders alone when they hold them all (fast), else with lm-eval's catalogue too
    (~14 k YAMLs, ~12 s to index; once per process). An unknown name is refused first."""
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not Path(folder).is_dir():
            raise ConfigError("--include-path", folder, "no such folder of task YAMLs")
    local = TaskManager(include_defaults=False, include_path=include or None)
    local_names = set(local.all_tasks)
    missing = [n for n in names if n not in local_names]
    if not missing:
        return local, local_names
    mentioned, catalogue = catalogue_scan(missing)
    for n in missing:
        if n not in mentioned:
            near = closest(n, sorted(local_names | catalogue))
            raise ConfigError(
                "--tasks",
                n,
                "no such lm-eval task, group or tag"
                + (f" (closest: {', '.join(near)})" if near else "")
                + f"; local tasks: {', '.join(sorted(local_names)) or 'none'}; give one of "
                "them, or a folder of task YAMLs with --include-path",
            )
    key = tuple(include)
    if key not in _CATALOGUE:
        _CATALOGUE[key] = TaskManager(include_defaults=True, include_path=include or None)
    manager = _CATALOGUE[key]
    for n in missing:
        if n not in manager.all_tasks:  # mentioned, but not as a name (e.g. in a prompt)
            raise ConfigError(
                "--tasks",
                n,
                "no such lm-eval task, group or tag; local tasks: "
                f"{', '.join(sorted(local_names)) or 'none'}; give one of them, or a folder "
                "of task YAMLs with --include-path",
            )
    return manager, local_names


def load_tasks(manager: Any, names: list[str], local: set[str]) -> list[Any]:
    """Each named task built (its data set loaded); a failure names the task and the fix."""
    built = []
    for n in names:
        try:
            task = manager._load_spec(n)  # a Task, a Group, or a tag's list of Tasks
        except Exception as err:  # lm-eval/datasets raise many kinds; each is one bad task
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if isinstance(err, ConnectionError) or "offline" in why.lower():
                fix = (
                    "its data set is not on this machine and would be downloaded (lm-eval's "
                    "catalogue tasks download theirs; offline here): use a local task "
                    "(configs/lm_eval, e.g. movie_reviews_completion) or --include-path DIR "
                    "with a task whose dataset is a local file, or --online where a network is"
                )
            elif n in local:
                fix = "fix its YAML or its local data file"
            else:
                fix = "lm-eval could not build it: check the task's name and its data set"
            raise ConfigError("--tasks", n, f"{fix} ({why[:200]})") from None
        built.extend(task if isinstance(task, list) else [task])
    return built


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for task, values in results.get("results", {}).items():
        row: dict[str, float | None] = {}
        for key, v in values.items():
            if "," not in key:  # alias, name, sample_len: not metrics
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric},{filt}"
            try:
                row[name] = float(v)
            except ValueError:  # "N/A" stderr
                row[name] = None
        out[task] = row
    return out


def run(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """Evaluate and write the result JSON (see the module docstring)."""
    ckpt = Path(args.ckpt)
    output = Path(args.output) if args.output else ckpt.with_name(f"{ckpt.stem}.lm_eval.json")
    if output.exists() and not args.overwrite:
        raise ConfigError(
            "--output",
            str(output),
            "the file exists: pass --overwrite to replace it, or give another --output",
        )
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks", args.tasks, "give comma-separated task names")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", args.batch_size, "use a positive batch size")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError("--limit", args.limit, "use a positive count (or a fraction < 1)")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError(
            "lm-eval", None, 'not installed: pip install "kd-lightning[eval]"'
        ) from None
    import torch

    if not ckpt.is_file():
        raise ConfigError(
            "--ckpt", str(ckpt), "no such file: train the model first (kd-lightning fit)"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", device, "no CUDA device here: use --device cpu")
    include = [*default_include(), *args.include_path]
    with offline(not args.online):
        # the tasks first: a bad name or an unreachable data set fails before the model loads
        manager, local = task_manager(names, include)
        if any(n in BUNDLED_TASKS for n in names) and not TASK_DATA.is_file():
            write_task_data(TASK_DATA, seed=args.seed)
        tasks = load_tasks(manager, names, local)
        model, info = load_student(ckpt)
        tokenizer, tok_dir = find_tokenizer(info, args.tokenizer)
        lm = HFLM(
            pretrained=model.to(device),
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            device=device,
        )
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=args.num_fewshot,
            limit=limit,
            bootstrap_iters=args.bootstrap_iters,
            log_samples=False,
            task_manager=manager,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    metrics = _metrics(results)
    task_files = sorted(
        {str(p) for folder in include for p in Path(folder).glob("*.py")}
        | {str(p) for folder in include for p in Path(folder).glob("*.yaml")}
    )
    record = {
        "kind": "lm_eval",
        "tasks": metrics,
        "n_samples": results.get("n-samples", {}),
        "versions": {k: v for k, v in results.get("versions", {}).items()},
        "settings": {
            "tasks": names,
            "limit": args.limit,
            "num_fewshot": args.num_fewshot,
            "batch_size": args.batch_size,
            "bootstrap_iters": args.bootstrap_iters,
            "device": device,
            "online": bool(args.online),
        },
        "checkpoint": info,
        "tokenizer": tok_dir,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "provenance": provenance(command, task_files),
    }
    bad = [
        f"{t}/{m}"
        for t, row in metrics.items()
        for m, v in row.items()
        if v is not None and not m.endswith("_stderr") and not math.isfinite(v)
    ]
    if bad:
        record["non_finite"] = bad
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(output)
    for task, row in metrics.items():
        shown = ", ".join(
            f"{m} {v:.4g}" for m, v in row.items() if v is not None and not m.endswith("_stderr")
        )
        print(f"kd-lightning lm-eval: {task}: {shown}")
    print(f"kd-lightning lm-eval: wrote {output}")
    return record
