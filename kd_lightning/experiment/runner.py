"""``kd-lightning experiment --config configs/experiments/<name>.yaml``.

Runs, in this order and in this process, each as an ordinary ``kd-lightning fit``:

1. the teacher (or only tests a given checkpoint);
2. the from-scratch student, once per seed;
3. every KD stage, once per seed, distilling from the teacher's best-val checkpoint; a KD
   stage with ``token_store`` (causal LMs) first has its top-k token store filled from that
   checkpoint (``kd-lightning data store-teacher``), and its runs read the teacher from it.

Every fitted run is then tested twice — with its best-val checkpoint and with its final
weights (``checkpoints/final.ckpt``); a run without a validation split (``val_fraction: 0``,
the published CIFAR protocol) has no best-val number and distils from / is tested with its
final weights. A run with the ``TestEveryEpoch`` callback (the reproduction configs) also
records its best epoch on test, the number mdistiller and KD-Zoo publish. Test-set
predictions are saved, so agreement with the teacher and the
reliability diagrams come from the same numbers. A finished run leaves ``done.json``; a
rerun skips it unless its arguments or config files changed, so a crashed experiment resumes.

Layout of ``<output_dir>``::

    results.{csv,json,md}  plots/*.png  experiment.yaml  overrides.yaml
    <stage>/overrides.yaml  <stage>/token_store/ (a token_store stage's store)
    <stage>/seed<k>/{done.json, command.txt, history.jsonl, test_predictions.pt,
                     checkpoints/, logs/ or wandb/}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from kd_lightning.callbacks.test_every_epoch import TestEveryEpoch
from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.errors import ConfigError
from kd_lightning.experiment.launch import RunJob
from kd_lightning.experiment.progress import ProgressCallback
from kd_lightning.experiment.results import LM_METRIC_NAMES, aggregate, text_table, write_results
from kd_lightning.experiment.spec import (
    ExperimentSpec,
    Stage,
    TeacherStage,
    check_token_store,
    parse_spec,
    resolve_path,
)
from kd_lightning.machine import machine_info
from kd_lightning.modules.inputs import model_inputs
from kd_lightning.tracking import git_revision, log_experiment_to_wandb, log_summary, wandb_settings

PROGRESS = f"{ProgressCallback.__module__}.{ProgressCallback.__qualname__}"
_MISSING = object()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``kd-lightning experiment ...``; returns the rows of the results table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    export, argv = _pop_flag(argv, "--export-wandb-sweep")
    spec = parse_spec(argv)
    if export is not None:  # write the W&B sweep file instead of running
        from kd_lightning.experiment.wandb_sweep import export_wandb_sweep

        path = export_wandb_sweep(spec, spec.grid, export, spec.out_dir.resolve())
        print(f"[{spec.name}] W&B sweep → {path}  (then: wandb sweep {path.name}; wandb agent <id>)")
        return []
    return Experiment(spec, argv=argv).run()


def _pop_flag(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """``flag value`` or ``flag=value`` taken out of ``argv`` (the spec parser does not know it)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == flag or a == flag.replace("-", "_").replace("__", "--", 1):
            if i + 1 >= len(argv):
                raise ConfigError(flag.lstrip("-"), None, f"give a file name: {flag} sweep.yaml")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


class Experiment:
    """Plans, runs (or skips) and summarises the runs of one ``ExperimentSpec``."""

    def __init__(self, spec: ExperimentSpec, argv: list[str] | None = None) -> None:
        self.spec = spec
        #: the command line after ``kd-lightning experiment`` (recorded in the results)
        self.argv = argv
        self.out = spec.out_dir.resolve()
        #: stage name → "csv" | "tensorboard" | "wandb" | "none" | "other"
        self.loggers = {stage.name: self._logger_kind(stage) for _, stage in spec.stages()}
        if spec.online and "wandb" not in self.loggers.values():
            raise ConfigError(
                "online", True, "online only applies to W&B: also set logger: configs/logger/wandb.yaml"
            )

    # -- the whole experiment -------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        spec, t0 = self.spec, time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "experiment.yaml").write_text(
            yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False)
        )
        n_students = len(spec.stages()) - 1
        n_runs = 1 + len(spec.seeds) * n_students
        print(f"[{spec.name}] {n_runs} runs → {self.out}"
              + (f" ({spec.launcher} launcher)" if spec.launcher != "sequential" else ""), flush=True)
        self._progress = _RunProgress(n_runs)
        from kd_lightning.experiment.launch import make_launcher

        launcher = make_launcher(spec, self.out)
        search = None
        try:
            with _quiet_lightning():
                self._preflight()
                records = self._launch([self._teacher_plan_job()], launcher)
                teacher_dir = self._run_dir(spec.teacher, records[0]["seed"])
                for _, stage in spec.stages()[1:]:  # before their students: the stores
                    if getattr(stage, "token_store", None) is not None:
                        self._fill_token_store(stage, records[0])
                records += self._launch([
                    self._student_job(kind, stage, seed, records[0], teacher_dir)
                    for kind, stage in spec.stages()[1:] for seed in spec.seeds
                ], launcher)
                if spec.search is not None:
                    from kd_lightning.experiment.search import run_search

                    search = run_search(self, records[0], teacher_dir)
        finally:
            launcher.close()
        order = [(kind, stage.name) for kind, stage in spec.stages()]
        rows = aggregate(records, order, spec.published)
        meta = {
            "name": spec.name, "seeds": spec.seeds, "output_dir": str(self.out),
            "published_source": spec.published_source,
            "teacher_checkpoint": records[0]["best_ckpt"],
            "wall_seconds_this_invocation": round(time.perf_counter() - t0, 1),
            "run_seconds_total": round(sum(r.get("seconds") or 0 for r in records), 1),
            "machine": machine_info(), **git_revision(),
            **self._provenance(),
        }
        stores = {s.name: str(self.token_store_path(s)) for _, s in spec.stages()[1:]
                  if getattr(s, "token_store", None) is not None}
        if stores:
            meta["token_stores"] = stores
        if search is not None:
            meta["search"] = {k: search[k] for k in ("best", "n_complete", "n_pruned", "n_failed")}
        paths = write_results(rows, records, self.out, meta)
        print(f"\n[{spec.name}] results ({len(records)} runs, {meta['run_seconds_total']:.0f} s of "
              f"training+testing)\n{text_table(rows)}\n→ {paths['md']}", flush=True)
        if search is not None:  # the trials and the best parameters, after the main table
            with paths["md"].open("a") as fh:
                fh.write("\n" + search["markdown"])
            print(f"\n{search['markdown']}", flush=True)
        images: list[Path] = []
        if spec.plots:
            from kd_lightning.experiment.plots import make_plots

            images = make_plots(self.out, rows, records)
        if "wandb" in self.loggers.values():
            log_experiment_to_wandb(
                spec.name, self.out, [_flat(r) for r in rows], images, spec.online,
                wandb_settings(self._logger_entry(spec.teacher)[1]),
            )
        return rows

    def _provenance(self) -> dict[str, Any]:
        """The command, config-file digests and resolved-spec hash of this experiment."""
        from kd_lightning.provenance import provenance

        spec = self.spec
        files = [*spec.base, *((spec.logger,) if spec.logger else ())]
        for _, stage in spec.stages():
            files += stage.configs
        paths = [resolve_path(spec, f, "configs") for f in files]
        experiment_files = [a for a in (self.argv or []) if a.endswith((".yaml", ".yml"))]
        command = ["kd-lightning", "experiment", *(self.argv or [])] if self.argv is not None else None
        return provenance(command, [*experiment_files, *paths], dataclasses.asdict(spec))

    # -- the stages -----------------------------------------------------------------------
    def _teacher_plan(self) -> tuple[list[str], str, bool]:
        """(arguments, what else the run depends on, fit?) of the teacher run."""
        stage, seed = self.spec.teacher, self.spec.teacher.seed
        run_dir = self._run_dir(stage, seed)
        if stage.checkpoint is None:
            return self._fit_args("teacher", stage, seed, run_dir), "", True
        ckpt = resolve_path(self.spec, stage.checkpoint, "teacher.checkpoint")
        stat = ckpt.stat()  # a replaced checkpoint file makes every run stale
        return self._test_args(stage, seed, run_dir, ckpt), f"{ckpt}:{stat.st_size}:{stat.st_mtime_ns}", False

    def _teacher_plan_job(self) -> dict[str, Any] | RunJob:
        stage, seed = self.spec.teacher, self.spec.teacher.seed
        args, extra, fit = self._teacher_plan()
        return self._plan("teacher", stage, seed, self._run_dir(stage, seed), args, extra, fit=fit)

    def _student_job(self, kind: str, stage: Stage, seed: int, teacher: dict[str, Any],
                     teacher_dir: Path, extra_args: list[str] | None = None) -> dict[str, Any] | RunJob:
        run_dir = self._run_dir(stage, seed)
        args = self._fit_args(kind, stage, seed, run_dir, teacher_ckpt=teacher["best_ckpt"])
        return self._plan(kind, stage, seed, run_dir, [*args, *(extra_args or [])],
                          key_extra=self._student_key_extra(stage, teacher), teacher_dir=teacher_dir)

    def _student_key_extra(self, stage: Stage, teacher: dict[str, Any]) -> str:
        """What a student run depends on besides its arguments: the teacher run, and for a
        token-store stage the store (a refilled store makes its runs stale)."""
        if stage.token_store is None:
            return teacher["key"]
        return teacher["key"] + ":" + self._token_store_plan(stage, teacher["best_ckpt"])[1]

    # -- token stores (causal-LM KD stages that read the teacher from disk) ----------------
    def token_store_path(self, stage: Stage) -> Path:
        settings = check_token_store(stage.token_store, f"{stage.name}.token_store")
        if settings["path"]:
            return Path(settings["path"]).expanduser().resolve()
        return self.out / stage.name / "token_store"

    def _token_store_plan(self, stage: Stage, teacher_ckpt: str) -> tuple[list[str], str]:
        """(the ``kd-lightning data store-teacher`` arguments that fill ``stage``'s store from
        ``teacher_ckpt``, the key of that store: the arguments, the stage's config files and
        the checkpoint's bytes)."""
        settings = check_token_store(stage.token_store, f"{stage.name}.token_store")
        argv = ["store-teacher"]
        for f in [*self._config_files(stage), *self._fragments(stage)]:
            argv += ["-c", str(f)]
        argv += [
            "--output", str(self.token_store_path(stage)), "--k", str(settings["k"]),
            "--value_dtype", settings["value_dtype"], "--batch_size", str(settings["batch_size"]),
            "--stages", settings["stages"],
            f"--model.init_args.teacher={json.dumps({'checkpoint': teacher_ckpt})}",
        ]
        # the experiment's raw --data.*/--model.* flags reach the store as they reach the runs
        argv += [a for a in self.spec.args if a.startswith(("--data.", "--model."))]
        cache = self.__dict__.setdefault("_ckpt_digests", {})
        ckpt = Path(teacher_ckpt)
        stat = ckpt.stat()
        ident = (str(ckpt), stat.st_size, stat.st_mtime_ns)
        if ident not in cache:
            cache[ident] = _file_digest(ckpt)
        return argv, _run_key(argv, cache[ident])

    def _fill_token_store(self, stage: Stage, teacher: dict[str, Any]) -> Path:
        """Fill ``stage``'s token store from the experiment's teacher, unless the store there
        was filled by this experiment with the same teacher checkpoint, configs and settings
        (``experiment_key.json`` beside its ``meta.json``). A store of this experiment with
        another key (a retrained teacher, other data or k) is deleted and rewritten; a
        complete store the experiment did not write is refused, never deleted."""
        from kd_lightning.data.commands import main as data_main

        path = self.token_store_path(stage)
        argv, key = self._token_store_plan(stage, teacher["best_ckpt"])
        marker, tag = path / "experiment_key.json", f"[{self.spec.name}] {stage.name} token store"
        if (path / "meta.json").is_file():
            if not marker.is_file():
                raise ConfigError(
                    f"{stage.name}.token_store.path", str(path), "holds a token store this "
                    "experiment did not write: give another path (the experiment only "
                    "rewrites its own stores)",
                )
            if json.loads(marker.read_text()).get("key") == key:
                print(f"{tag}: filled before from this teacher, reused ({path})", flush=True)
                return path
            print(f"{tag}: written for another teacher or other settings: rewriting it",
                  flush=True)
            shutil.rmtree(path)
        print(f"{tag}: filling it from {teacher['best_ckpt']} → {path}", flush=True)
        t0 = time.perf_counter()
        data_main(argv)
        marker.write_text(json.dumps({"key": key, "command": ["kd-lightning", "data", *argv],
                                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        return path

    # -- building one run's arguments ----------------------------------------------------
    def _run_dir(self, stage: Stage | TeacherStage, seed: int) -> Path:
        return self.out / stage.name / f"seed{seed}"

    def _config_files(self, stage: Stage | TeacherStage) -> list[Path]:
        spec = self.spec
        files = [resolve_path(spec, p, f"base[{i}]") for i, p in enumerate(spec.base)]
        files += [resolve_path(spec, p, f"{stage.name}.configs[{i}]") for i, p in enumerate(stage.configs)]
        if spec.logger:
            files.append(resolve_path(spec, spec.logger, "logger"))
        return files

    def _fragments(self, stage: Stage | TeacherStage) -> list[Path]:
        """The experiment's and the stage's ``overrides`` as config files (applied last)."""
        out = []
        for data, path in ((self.spec.overrides, self.out / "overrides.yaml"),
                           (stage.overrides, self.out / stage.name / "overrides.yaml")):
            if data:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(yaml.safe_dump(data, sort_keys=False))
                out.append(path)
        return out

    def _common_args(self, kind: str, stage: Stage | TeacherStage, seed: int, run_dir: Path) -> list[str]:
        args = []
        for f in [*self._config_files(stage), *self._fragments(stage)]:
            args += ["-c", str(f)]
        args += [f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}"]
        logger = self.loggers[stage.name]
        if logger == "csv" and self._logger_entry(stage)[1] is None:
            # no logger in any config: the CLI's default CSVLogger, spelled out in full
            # (init_args alone do not reach a trainer default in every subcommand)
            args.append("--trainer.logger=" + json.dumps({
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "logs"}}))
        elif logger in ("csv", "tensorboard"):
            args += [f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.logger.init_args.name=logs"]
        elif logger == "wandb":
            args += [
                f"--trainer.logger.init_args.save_dir={run_dir}",
                f"--trainer.logger.init_args.name={stage.name}-seed{seed}",
                f"--trainer.logger.init_args.group={self.spec.name}",
                f"--trainer.logger.init_args.job_type={kind}",
            ]
            if self.spec.online:
                args.append("--trainer.logger.init_args.offline=false")
        return args

    def _fit_args(self, kind: str, stage: Stage | TeacherStage, seed: int, run_dir: Path,
                  teacher_ckpt: str | None = None) -> list[str]:
        progress = {"class_path": PROGRESS, "init_args": {
            "label": f"[{self.spec.name}] {stage.name} seed {seed}",
            "history_path": str(run_dir / "history.jsonl"),
        }}
        args = ["fit", *self._common_args(kind, stage, seed, run_dir),
                "--test_after_fit=false", f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
                "--trainer.enable_progress_bar=false",
                f"--trainer.callbacks+={json.dumps(progress)}"]
        if kind == "kd":
            # every KD stage distils from this experiment's teacher
            args.append(f"--model.init_args.teacher={json.dumps({'checkpoint': teacher_ckpt})}")
            if getattr(stage, "token_store", None) is not None:  # filled from that teacher
                args.append(f"--model.init_args.token_store={self.token_store_path(stage)}")
        return [*args, *self.spec.args]

    def _test_args(self, stage: TeacherStage, seed: int, run_dir: Path, ckpt: Path) -> list[str]:
        """Test a reused teacher checkpoint: its architecture is read from the file."""
        hparams = _load_ckpt(ckpt, "teacher.checkpoint").get("hyper_parameters", {})
        if "model" not in hparams:
            raise ConfigError("teacher.checkpoint", str(ckpt), "this is not a ClassifierModule checkpoint")
        return ["test", *self._common_args("teacher", stage, seed, run_dir),
                "--model=kd_lightning.modules.ClassifierModule",
                f"--model.init_args.model={hparams['model']}",
                f"--model.init_args.model_kwargs={json.dumps(hparams.get('model_kwargs') or {})}",
                f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=false", *self.spec.args]

    def _logger_entry(self, stage: Stage | TeacherStage) -> tuple[str, Any]:
        """The ``trainer.logger`` value this stage's runs end up with (last one wins)."""
        entry: Any = _MISSING
        sources = [yaml.safe_load(f.read_text()) for f in self._config_files(stage)]
        for data in [*sources, self.spec.overrides, stage.overrides]:
            trainer = (data or {}).get("trainer") if isinstance(data, dict) else None
            if isinstance(trainer, dict) and "logger" in trainer:
                entry = trainer["logger"]
        for a in self.spec.args:
            if a.startswith("--trainer.logger="):
                entry = yaml.safe_load(a.split("=", 1)[1])
        if entry is _MISSING:
            return "csv", None  # kd_lightning.cli's default
        if entry is False:
            return "none", entry
        class_path = entry.get("class_path", "") if isinstance(entry, dict) else str(entry or "")
        for kind, cls in (("wandb", "WandbLogger"), ("tensorboard", "TensorBoardLogger"),
                          ("csv", "CSVLogger")):
            if class_path.endswith(cls):
                return kind, entry
        return "other", entry  # trainer.default_root_dir still keeps it inside the run dir

    def _logger_kind(self, stage: Stage | TeacherStage) -> str:
        return self._logger_entry(stage)[0]

    def _preflight(self) -> None:
        """Parse the arguments of every stage that still has runs to do, before anything
        trains: a typo in a KD stage must not surface only after the teacher and the
        scratch runs have finished."""
        spec, checks = self.spec, []
        t_args, t_extra, _ = self._teacher_plan()
        t_dir = self._run_dir(spec.teacher, spec.teacher.seed)
        teacher = _finished(t_dir, _run_key(t_args, t_extra))
        if teacher is None:
            checks.append(("teacher", t_args))
        for kind, stage in spec.stages()[1:]:
            field = "scratch" if kind == "scratch" else f"kd[{spec.kd.index(stage)}]"
            ckpt = teacher["best_ckpt"] if teacher else str(t_dir / "checkpoints" / "best.ckpt")
            todo = [
                args for seed in spec.seeds
                for args in [self._fit_args(kind, stage, seed, self._run_dir(stage, seed), ckpt)]
                if teacher is None or _finished(
                    self._run_dir(stage, seed), _run_key(args, self._student_key_extra(stage, teacher))
                ) is None
            ]
            if todo:
                checks.append((field, todo[0]))
        from kd_lightning.cli import main as cli_main

        for field, args in checks:
            err = io.StringIO()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    cli_main([*args, "--print_config"])
            except ConfigError as exc:  # the CLI's own one-line errors (unknown names …)
                raise ConfigError(
                    field, exc.value, f"kd-lightning {args[0]} rejects this stage's arguments: {exc}"
                ) from None
            except SystemExit as exc:
                if exc.code not in (0, None):
                    reason = " ".join(err.getvalue().strip().splitlines()[-8:])
                    raise ConfigError(
                        field, args[1:], f"kd-lightning {args[0]} rejects these arguments: {reason}"
                    ) from None

    # -- running ---------------------------------------------------------------------------
    def _plan(self, kind: str, stage: Stage | TeacherStage, seed: int, run_dir: Path,
              args: list[str], key_extra: str, fit: bool = True,
              teacher_dir: Path | None = None) -> dict[str, Any] | RunJob:
        """A finished run's record (skipped), or the job that (re-)runs it, its folder ready."""
        key = _run_key(args, key_extra)
        done = run_dir / "done.json"
        tag = f"[{self.spec.name}] {stage.name} seed {seed}"
        record = _finished(run_dir, key)
        progress = self._progress_or_new()
        if record is not None:
            progress.done(None)
            print(f"{tag}: done before, skipped ({done})  {progress}", flush=True)
            return record
        if done.is_file():
            if not self.spec.overwrite and _finished(run_dir, None) is not None:
                raise ConfigError(
                    "overwrite", False, f"{run_dir} holds a finished run whose arguments or "
                    "config files changed since: pass --overwrite true to replace it, or give "
                    "another --output_dir",
                )
            print(f"{tag}: its arguments or config files changed since it finished: re-running "
                  "(--overwrite)", flush=True)
        if run_dir.exists():  # an unfinished (crashed) or stale run restarts from scratch
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "command.txt").write_text("kd-lightning " + shlex.join(args) + "\n")
        return RunJob(kind=kind, stage=stage.name, seed=seed, run_dir=str(run_dir), args=args,
                      key=key, fit=fit, teacher_dir=None if teacher_dir is None else str(teacher_dir))

    def _progress_or_new(self) -> _RunProgress:
        if getattr(self, "_progress", None) is None:
            self._progress = _RunProgress(1)
        return self._progress

    def _launch(self, planned: list[dict[str, Any] | RunJob], launcher: Any) -> list[dict[str, Any]]:
        """Records in ``planned`` order: finished ones as they are, the jobs run by
        ``launcher`` (all at once, ``parallel`` at a time)."""
        jobs = [p for p in planned if isinstance(p, RunJob)]
        threads, to_file = launcher.threads(), launcher.name != "sequential"
        for job in jobs:
            job.threads, job.log_to_file = threads, to_file
            what = "training" if job.fit else "testing the given checkpoint"
            where = f" ({launcher.name}; log: {Path(job.run_dir) / 'run.log'})" if to_file else ""
            print(f"[{self.spec.name}] {job.stage} seed {job.seed}: {what}{where}", flush=True)
        results: dict[str, dict[str, Any]] = {}

        def on_done(job: RunJob, record: dict[str, Any]) -> None:
            results[job.run_dir] = record
            self._report(job, record)

        if jobs:
            launcher.run(jobs, on_done)
        return [results[p.run_dir] if isinstance(p, RunJob) else p for p in planned]

    def _report(self, job: RunJob, record: dict[str, Any]) -> None:
        progress = self._progress_or_new()
        parts = [f"{record[key]:.4f} ({label})" for key, label in (
            ("test_acc_best", f"best-val ckpt, epoch {record['best_epoch']}"),
            ("test_acc_last", "last epoch"), ("test_acc_best_on_test", "best epoch on test"),
        ) if record.get(key) is not None]
        progress.done(record["seconds"])
        what = f"test acc {', '.join(parts) or '—'}"
        if not parts and record.get("test_nll_best") is not None:  # a causal LM: NLL, KL
            epoch = f", epoch {record['best_epoch']}" if record.get("best_epoch") else ""
            what = f"test NLL {record['test_nll_best']:.4f} (best-val ckpt{epoch})"
            if record.get("test_kl_best") is not None:
                what += f", KL(teacher ‖ student) {record['test_kl_best']:.4f}"
        print(f"[{self.spec.name}] {job.stage} seed {job.seed}: {what}"
              f"  [{record['seconds']:.1f} s]  {progress}", flush=True)


class _RunProgress:
    """``runs done/total, ETA``: the ETA is the mean time of the runs trained in this
    invocation times the runs left (skipped runs count as done and take no time)."""

    def __init__(self, total: int) -> None:
        self.total, self.finished, self.trained_seconds = total, 0, []

    def done(self, seconds: float | None) -> None:
        self.finished += 1
        if seconds is not None:
            self.trained_seconds.append(seconds)

    def eta_seconds(self) -> float | None:
        if not self.trained_seconds:
            return None
        left = self.total - self.finished
        return left * sum(self.trained_seconds) / len(self.trained_seconds)

    def __str__(self) -> str:
        eta = self.eta_seconds()
        text = "—" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        return f"({self.finished}/{self.total} runs done, ETA {text})"


# -- helpers on a finished CLI run ------------------------------------------------------------
def _fit_then_test(cli: Any, run_dir: Path) -> dict[str, Any]:
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    ckpt = trainer.checkpoint_callback
    if ckpt is None:
        raise ConfigError("checkpoint", None, "the run saved no checkpoint; keep checkpointing enabled")
    # The final weights, saved here: ModelCheckpoint's last.ckpt is only refreshed when a
    # new best is saved (Lightning ≥ 2.6), so it can be the best epoch, not the last one.
    last = str(run_dir / "checkpoints" / "final.ckpt")
    trainer.save_checkpoint(last, weights_only=False)
    best = ckpt.best_model_path or last  # no validation at all: the last epoch is all there is
    has_val = bool(ckpt.monitor) and bool(ckpt.best_model_path)
    record: dict[str, Any] = {"best_ckpt": best, "last_ckpt": last, "epochs": trainer.current_epoch,
                              "has_val": has_val}
    every_epoch = next((c for c in trainer.callbacks if isinstance(c, TestEveryEpoch)), None)
    on_test = every_epoch.summary()["best_on_test"] if every_epoch and every_epoch.history else {}
    record["test_acc_best_on_test"] = on_test.get("value")
    record["best_on_test_epoch"] = on_test.get("epoch")
    preds: dict[str, torch.Tensor] = {}
    for which, path in (("last", last), ("best", best)):  # best last: the model ends on it
        out = trainer.test(model, datamodule=dm, ckpt_path=path, weights_only=False, verbose=False)
        record.update(_test_metrics(out[0] if out else {}, which))
        preds[f"probs_{which}"], preds["labels"] = _predict(model, dm)
    # checkpoints store the 0-based epoch they were saved in; report epochs 1-based like the logs
    record["best_epoch"] = int(_load_ckpt(Path(best), "checkpoint")["epoch"]) + 1
    if not has_val:  # the "best" weights are the last epoch's: no best-val number exists
        record["test_acc_best"] = record["best_epoch"] = None
    record["params"] = _param_count(model)
    log_summary(trainer.loggers, {f"final/test_acc_{w}": record[f"test_acc_{w}"]
                                  for w in ("best", "last", "best_on_test")
                                  if record[f"test_acc_{w}"] is not None}, trainer.global_step)
    torch.save(preds, run_dir / "test_predictions.pt")
    return record


def _tested(cli: Any, run_dir: Path) -> dict[str, Any]:
    """A `test` run of an existing checkpoint: one set of weights, reported as best-val."""
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    record: dict[str, Any] = {"best_ckpt": str(trainer.ckpt_path), "last_ckpt": None, "epochs": None}
    record.update(_test_metrics(metrics, "best"))
    record.update({k: None for k in _test_metrics({}, "last")})
    epoch = _load_ckpt(Path(trainer.ckpt_path), "teacher.checkpoint").get("epoch")
    record["best_epoch"] = None if epoch is None else int(epoch) + 1
    record["params"] = _param_count(model)
    probs, labels = _predict(model, dm)
    torch.save({"probs_best": probs, "labels": labels}, run_dir / "test_predictions.pt")
    return record


def _test_metrics(out: dict[str, float], which: str) -> dict[str, float | None]:
    """The run's test metrics (both modules log the trained network as ``test/acc``)."""
    def pick(name: str) -> float | None:
        return float(out[f"test/{name}"]) if f"test/{name}" in out else None

    record = {
        f"test_acc_{which}": pick("acc"),
        f"test_ece_{which}": pick("ece"),
        f"test_acc_top5_{which}": pick("acc_top5"),
    }
    if which == "best":
        record["kl_teacher_student_best"] = pick("kl_teacher_student")
        record["teacher_test_acc"] = pick("teacher_acc")
        # causal-LM runs (kd_lightning.modules.lm_distillation): held-out NLL, KL, ROUGE-L
        record.update({f"test_{m}_best": pick(m) for m in LM_METRIC_NAMES if pick(m) is not None})
    return record


@torch.inference_mode()
def _predict(model: torch.nn.Module, dm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels on the whole test split, in the loader's order."""
    model.eval()
    device = next(model.parameters()).device
    probs, labels = [], []
    # the trained network reads the batch as every module does (kd_lightning.modules.inputs)
    net, role = (model.student, "student") if hasattr(model, "student") else (model.model, "model")
    for batch in dm.test_dataloader():
        if "label" not in batch:  # a causal LM's batch: no class predictions to save
            return torch.empty(0), torch.empty(0)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        probs.append(model(*model_inputs(net, batch, role)).float().softmax(dim=1).cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(probs), torch.cat(labels)


def _agreement(run_dir: Path, teacher_dir: Path) -> dict[str, float | None]:
    student = torch.load(run_dir / "test_predictions.pt", weights_only=True)
    teacher = torch.load(teacher_dir / "test_predictions.pt", weights_only=True)
    if not student["labels"].numel():  # causal LMs: KL to the teacher is recorded instead
        return {}
    if not torch.equal(student["labels"], teacher["labels"]):
        raise ConfigError(
            "base", "data", "the teacher and this student were tested on different test sets: "
            "keep the data settings (data.seed, fractions) identical across stages",
        )
    ref = teacher["probs_best"].argmax(1)
    return {f"agreement_{w}": float((student[f"probs_{w}"].argmax(1) == ref).float().mean())
            for w in ("best", "last") if f"probs_{w}" in student}


def _param_count(model: torch.nn.Module) -> int:
    """Parameters of the deployable network (the student; never the teacher or adapters)."""
    net = getattr(model, "student", None) or getattr(model, "model", None) or model
    return sum(p.numel() for p in net.parameters())


def _load_ckpt(path: Path, field: str) -> dict[str, Any]:
    return read_checkpoint(path, field, "train the teacher first or fix the path", mmap=True)


def _finished(run_dir: Path, key: str | None) -> dict[str, Any] | None:
    """The record of a finished run with exactly this key, else None."""
    done = run_dir / "done.json"
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except json.JSONDecodeError:  # cut short while writing: the run counts as unfinished
        return None
    # key None: any finished run (a torn done.json is a run that crashed while finishing)
    return record if key is None or record.get("key") == key else None


#: bumped when what a run records changes, so records of older runners count as stale
RECORD_VERSION = 3


def _run_key(args: list[str], extra: str) -> str:
    """Identifies a run by its arguments *and* the content of its config files."""
    h = hashlib.sha256(json.dumps([RECORD_VERSION, args]).encode() + extra.encode())
    for flag, value in zip(args, args[1:]):
        if flag == "-c":
            h.update(Path(value).read_bytes())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _finish_wandb() -> None:
    """Lightning's WandbLogger leaves its run open; the next run must not reuse it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        # wandb ≥ 0.31's finish() takes no ``quiet`` (it crashed the second run)
        wandb.finish()


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not isinstance(v, dict | list)}


@contextlib.contextmanager
def _quiet_lightning():
    """Progress lines instead of Lightning's per-run banners (GPU available …) and of
    warnings that repeat for every run without saying anything about the experiment."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
