"""Where an experiment's runs execute: in this process, N local processes, or Slurm.

* ``sequential`` (default): one run after another in this process.
* ``local``: ``parallel`` worker processes (spawned, so each has its own torch state); the
  machine's cores are split between them (``OMP_NUM_THREADS`` and ``torch.set_num_threads``
  = cores // parallel), and each run's output goes to ``<run_dir>/run.log``.
* ``slurm``: one submitit job per run (or per ``runs_per_job`` runs), with the spec's
  ``slurm`` parameters (``partition``, ``timeout_min``, ``gpus_per_node``, ``cpus_per_task`` …).
* ``submitit_local``: the same submitit code path on this machine (``LocalExecutor``: real
  jobs in subprocesses), as hydra-submitit's local launcher; tests and dry runs use it.

Whatever the launcher, a run is the same function (``execute``): it builds the
``kd-lightning fit``/``test`` run from its arguments and writes ``done.json``, so finished-run
skipping and the results table do not depend on where the run executed. The teacher runs
first (everything distils from it), then every student run at once, ``parallel`` at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kd_lightning.errors import ConfigError

LAUNCHERS = ("sequential", "local", "slurm", "submitit_local")
#: AutoExecutor's own (cluster-independent) parameters; every other ``slurm`` key is Slurm's
GENERIC_SUBMITIT = (
    "timeout_min",
    "mem_gb",
    "nodes",
    "tasks_per_node",
    "cpus_per_task",
    "gpus_per_node",
    "name",
    "stderr_to_stdout",
)


@dataclasses.dataclass
class RunJob:
    """One run, as it travels to a worker process or a Slurm job (plain data, picklable)."""

    kind: str
    stage: str
    seed: int
    run_dir: str
    args: list[str]
    key: str
    fit: bool = True
    teacher_dir: str | None = None
    #: torch threads of the run (None: leave the process's default)
    threads: int | None = None
    #: write the run's stdout/stderr to ``<run_dir>/run.log`` (not the launcher's terminal)
    log_to_file: bool = False


class RunFailed(RuntimeError):
    """A run in another process failed; the message names its log."""


def execute(job: RunJob) -> dict[str, Any]:
    """Fit (or test) one run, test it, write its ``done.json``; returns the record."""
    import torch

    from kd_lightning.cli import main as cli_main
    from kd_lightning.experiment.runner import (
        _agreement,
        _finish_wandb,
        _fit_then_test,
        _quiet_lightning,
        _tested,
    )

    run_dir = Path(job.run_dir)
    if job.threads:
        torch.set_num_threads(job.threads)
    log = _log_to(run_dir / "run.log") if job.log_to_file else contextlib.nullcontext()
    with log, _quiet_lightning():
        t0 = time.perf_counter()
        cli = None
        try:
            cli = cli_main(list(job.args))
            record = (_fit_then_test if job.fit else _tested)(cli, run_dir)
        finally:
            _finish_wandb()
        record.update(
            stage=job.stage,
            kind=job.kind,
            seed=job.seed,
            key=job.key,
            seconds=round(time.perf_counter() - t0, 2),
            command=list(job.args),
        )
        if job.teacher_dir is not None:
            record.update(_agreement(run_dir, Path(job.teacher_dir)))
        del cli
        gc.collect()
        (run_dir / "done.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def execute_many(jobs: list[RunJob]) -> list[dict[str, Any]]:
    """Run ``jobs`` one after another (a worker's or a Slurm job's share); a failure is
    returned as ``{"error": ...}`` so the other runs of the batch still finish."""
    out = []
    for job in jobs:
        try:
            out.append(execute(job))
        except BaseException as exc:  # noqa: BLE001 - reported by the launcher, with its log
            out.append({"error": _describe(exc), "run_dir": job.run_dir})
            if isinstance(exc, KeyboardInterrupt):
                raise
    return out


def _describe(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ConfigError):
        return {"config_error": [exc.field, repr(exc.value), exc.fix]}
    return {
        "message": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


def _raise(result: dict[str, Any], job: RunJob) -> None:
    err = result["error"]
    if "config_error" in err:
        field, value, fix = err["config_error"]
        raise ConfigError(field, value, fix)
    log = Path(job.run_dir) / "run.log"
    raise RunFailed(
        f"{job.stage} seed {job.seed} failed: {err['message']} "
        f"(its log: {log if log.is_file() else job.run_dir})"
    )


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (Python and C level) to ``path`` for a while."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("a") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# -- launchers ----------------------------------------------------------------------------
class Launcher:
    """Runs batches of independent jobs; ``on_done(job, record)`` is called as each finishes."""

    name = "sequential"

    def __init__(self, parallel: int = 1) -> None:
        self.parallel = max(1, parallel)

    def threads(self) -> int | None:
        return None

    def run(self, jobs: list[RunJob], on_done: Callable[[RunJob, dict[str, Any]], None]) -> None:
        for job in jobs:
            on_done(job, execute(job))

    def close(self) -> None:
        pass


class LocalLauncher(Launcher):
    """``parallel`` spawned worker processes, kept for the whole experiment (one torch
    import each), the cores split evenly between them."""

    name = "local"

    def __init__(self, parallel: int = 1) -> None:
        super().__init__(parallel)
        self._pool: Any = None

    def threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.parallel)

    def _executor(self) -> Any:
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # the children read these when torch loads (they inherit the environment)
            env = {k: str(self.threads()) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.parallel, mp_context=multiprocessing.get_context("spawn")
                )
                # start the workers now, while the environment holds the thread counts
                for f in [self._pool.submit(os.getpid) for _ in range(self.parallel)]:
                    f.result()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self._pool

    def run(self, jobs: list[RunJob], on_done: Callable[[RunJob, dict[str, Any]], None]) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        pool = self._executor()
        pending = {pool.submit(execute_many, [job]): job for job in jobs}
        failure = None
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                result = fut.result()[0]
                if "error" in result:
                    failure = failure or (result, job)  # let the runs in flight finish
                    for other in [f for f in pending if f.cancel()]:
                        pending.pop(other)
                else:
                    on_done(job, result)
        if failure:
            _raise(*failure)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class SubmititLauncher(Launcher):
    """submitit jobs: Slurm (``AutoExecutor(cluster="slurm")``) or this machine's
    ``LocalExecutor`` (``cluster="local"``), with the same spec; ``runs_per_job`` runs
    share one job (one torch import, one queue wait), ``parallel`` jobs are in flight."""

    def __init__(
        self,
        cluster: str,
        folder: Path,
        params: dict[str, Any],
        parallel: int | None,
        runs_per_job: int = 1,
    ) -> None:
        self.cluster, self.folder, self.params = cluster, folder, dict(params)
        self.name = "slurm" if cluster == "slurm" else "submitit_local"
        # Slurm queues any number of jobs; locally every job is a process on this machine
        super().__init__(parallel or (1_000_000 if cluster == "slurm" else 1))
        self.runs_per_job = max(1, runs_per_job)
        self._executor = self._make_executor()

    def threads(self) -> int | None:
        if "cpus_per_task" in self.params:
            return int(self.params["cpus_per_task"])
        if self.cluster == "local":
            return max(1, (os.cpu_count() or 1) // min(self.parallel, os.cpu_count() or 1))
        return None

    def _make_executor(self) -> Any:
        import submitit

        if self.cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError(
                "launcher",
                "slurm",
                "sbatch is not on PATH here: submit from a "
                "Slurm login node, or use launcher: submitit_local to try the jobs "
                "on this machine",
            )
        ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        try:
            ex.update_parameters(**slurm_parameters(self.params))
        except (NameError, ValueError, TypeError) as exc:
            raise ConfigError(
                "slurm", self.params, f"submitit refuses these parameters: {exc}"
            ) from None
        return ex

    def run(self, jobs: list[RunJob], on_done: Callable[[RunJob, dict[str, Any]], None]) -> None:
        batches = [jobs[i : i + self.runs_per_job] for i in range(0, len(jobs), self.runs_per_job)]
        in_flight: list[tuple[Any, list[RunJob]]] = []
        failure = None
        while batches or in_flight:
            while batches and len(in_flight) < self.parallel and failure is None:
                batch = batches.pop(0)
                self._executor.update_parameters(name=f"kd-{batch[0].stage}-seed{batch[0].seed}")
                in_flight.append((self._executor.submit(execute_many, batch), batch))
            if failure is not None:
                batches = []
            still = []
            for sub, batch in in_flight:
                if not sub.done():
                    still.append((sub, batch))
                    continue
                try:
                    results = sub.result()
                except Exception as exc:  # the job itself died (timeout, node failure …)
                    results = [{"error": {"message": f"submitit job {sub.job_id}: {exc}"}}] * len(
                        batch
                    )
                for job, result in zip(batch, results, strict=True):
                    if "error" in result:
                        failure = failure or (result, job)
                    else:
                        on_done(job, result)
            in_flight = still
            if in_flight:
                time.sleep(0.5)
        if failure:
            _raise(*failure)


def slurm_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``slurm`` block as AutoExecutor parameters: its own names stay, Slurm's
    (``partition``, ``account``, ``qos``, ``constraint`` …) get the ``slurm_`` prefix."""
    import submitit

    slurm = submitit.SlurmExecutor._valid_parameters()
    out = {}
    for key, value in params.items():
        bare = key.removeprefix("slurm_")
        if key in GENERIC_SUBMITIT:
            out[key] = value
        elif bare in slurm:
            out[f"slurm_{bare}"] = value
        else:
            raise ConfigError(
                f"slurm.{key}",
                value,
                f"not a submitit/Slurm parameter; use one of "
                f"{sorted(GENERIC_SUBMITIT)} or Slurm's {sorted(slurm)}",
            )
    return out


def make_launcher(spec: Any, out_dir: Path) -> Launcher:
    """The spec's launcher (``launcher``, ``parallel``, ``slurm``, ``runs_per_job``)."""
    if spec.launcher == "sequential":
        return Launcher()
    if spec.launcher == "local":
        return LocalLauncher(spec.parallel or 1)
    cluster = "slurm" if spec.launcher == "slurm" else "local"
    return SubmititLauncher(
        cluster, out_dir / "submitit", spec.slurm, spec.parallel, spec.runs_per_job
    )
