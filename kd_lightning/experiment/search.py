"""An Optuna search inside an experiment: the ``search:`` block of the spec.

.. code-block:: yaml

    search:
      stage: kd                    # the KD (or scratch) stage whose settings are searched
      n_trials: 20
      metric: val/acc              # any epoch-level metric the runs log
      direction: maximize
      sampler: {name: tpe, seed: 0}
      pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}
      parameters:
        model.init_args.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        model.init_args.heads.1.init_args.temperature: {type: categorical, choices: [1, 2, 4, 8]}

The teacher (and the grid's runs) run first; then each trial is one run of the stage
(``<stage>-trial<k>/seed<s>``), with the trial's values written into its overrides as a grid
does. The study lives in ``<output_dir>/search.db`` (SQLite, ``load_if_exists``), so a killed
search resumes: finished trials are kept, the trial that was running is marked failed and its
parameters are queued again, and the search runs until ``n_trials`` trials have finished
(completed or pruned). A trial's value is its best ``metric`` over epochs (the epoch the
best-val checkpoint also picks); bad trials are pruned after each validation through Optuna's
Lightning callback. Trials run one at a time in the experiment's process, whatever the launcher.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from kd_lightning.errors import ConfigError
from kd_lightning.experiment.spec import ExperimentSpec, Stage, set_dotted, stage_config

DISTRIBUTIONS = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median", "percentile", "threshold", "hyperband", "successive_halving")
_PRUNER_CLASSES = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "threshold": "ThresholdPruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
}


@dataclasses.dataclass
class SearchSpec:
    parameters: dict[str, dict[str, Any]]
    n_trials: int
    stage: str
    kind: str
    metric: str = "val/acc"
    direction: str = "maximize"
    sampler: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "median"})
    #: the seed of every trial's run (default: the experiment's first seed)
    seed: int = 0


def parse_search(spec: ExperimentSpec) -> SearchSpec:
    """The spec's ``search`` block, checked field by field (one-line ConfigErrors)."""
    block = dict(spec.search or {})
    known = {f.name for f in dataclasses.fields(SearchSpec)} - {"kind"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ConfigError(
            f"search.{unknown[0]}", block[unknown[0]], f"unknown field; use {sorted(known)}"
        )
    stages = {s.name: kind for kind, s in spec.stages()[1:]}
    stage = block.get("stage") or (spec.kd[0].name if spec.kd else None)
    if stage not in stages:
        raise ConfigError("search.stage", stage, f"name a KD or scratch stage: {sorted(stages)}")
    n_trials = block.get("n_trials")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError("search.n_trials", n_trials, "give the number of trials, an integer >= 1")
    direction = block.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError("search.direction", direction, "use maximize or minimize")
    metric = block.get("metric", "val/acc")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("search.metric", metric, "give a logged epoch metric, e.g. val/acc")
    params = block.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(
            "search.parameters",
            params,
            "give {dotted.config.key: {type: float, low: ..., high: ...}, ...}",
        )
    parsed = {key: _distribution(key, dist) for key, dist in params.items()}
    target = next(s for _, s in spec.stages()[1:] if s.name == stage)
    merged = stage_config(spec, target)
    for key, dist in parsed.items():  # every key lands somewhere in the stage's config
        probe = dist["choices"][0] if dist["type"] == "categorical" else dist["low"]
        set_dotted(copy.deepcopy(target.overrides), merged, key, probe, f"search.parameters.{key}")
    sampler = _named(block.get("sampler", {"name": "tpe", "seed": 0}), "search.sampler", SAMPLERS)
    pruner = _named(block.get("pruner", {"name": "median"}), "search.pruner", PRUNERS)
    seed = block.get("seed", spec.seeds[0])
    if not isinstance(seed, int):
        raise ConfigError("search.seed", seed, "give an integer seed")
    out = SearchSpec(
        parameters=parsed,
        n_trials=n_trials,
        stage=stage,
        kind=stages[stage],
        metric=metric,
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        seed=seed,
    )
    make_sampler(out)
    make_pruner(out)
    return out


def _distribution(key: str, dist: Any) -> dict[str, Any]:
    field = f"search.parameters.{key}"
    if isinstance(dist, list):  # shorthand: a list of choices
        dist = {"type": "categorical", "choices": dist}
    if not isinstance(dist, dict):
        raise ConfigError(field, dist, "give {type: float|int|categorical, ...}")
    kind = dist.get("type")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{field}.type", kind, f"use one of {list(DISTRIBUTIONS)}")
    allowed = {
        "categorical": {"type", "choices"},
        "float": {"type", "low", "high", "log", "step"},
        "int": {"type", "low", "high", "log", "step"},
    }[kind]
    extra = sorted(set(dist) - allowed)
    if extra:
        raise ConfigError(
            f"{field}.{extra[0]}",
            dist[extra[0]],
            f"a {kind} distribution takes {sorted(allowed - {'type'})}",
        )
    if kind == "categorical":
        if not isinstance(dist.get("choices"), list) or not dist["choices"]:
            raise ConfigError(f"{field}.choices", dist.get("choices"), "give a non-empty list")
        return dict(dist)
    low, high = dist.get("low"), dist.get("high")
    number = int if kind == "int" else (int, float)
    for name, v in (("low", low), ("high", high)):
        if not isinstance(v, number) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{field}.{name}", v, f"give a finite {kind}")
    if low > high:
        raise ConfigError(f"{field}.low", low, f"low must not exceed high ({high})")
    if dist.get("log") and low <= 0:
        raise ConfigError(f"{field}.low", low, "a log distribution needs low > 0")
    if dist.get("log") and dist.get("step") is not None:
        raise ConfigError(f"{field}.step", dist["step"], "give step or log: true, not both")
    return dict(dist)


def _named(value: Any, field: str, names: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or value.get("name") not in names:
        got = value.get("name") if isinstance(value, dict) else value
        raise ConfigError(f"{field}.name", got, f"use one of {list(names)}")
    return dict(value)


def make_sampler(search: SearchSpec) -> Any:
    import optuna

    kwargs = {k: v for k, v in search.sampler.items() if k != "name"}
    cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    try:
        return cls[search.sampler["name"]](**kwargs)
    except TypeError as exc:
        raise ConfigError("search.sampler", search.sampler, f"optuna refuses it: {exc}") from None


def make_pruner(search: SearchSpec) -> Any:
    import optuna

    name = search.pruner["name"]
    if name == "none":
        return optuna.pruners.NopPruner()
    kwargs = {k: v for k, v in search.pruner.items() if k != "name"}
    try:
        return getattr(optuna.pruners, _PRUNER_CLASSES[name])(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("search.pruner", search.pruner, f"optuna refuses it: {exc}") from None


def storage_url(out_dir: Path) -> str:
    return f"sqlite:///{out_dir / 'search.db'}"


def _optuna_pruning_base() -> type:
    # optuna-integration 4.x/5.x imports ``lightning.pytorch`` (not ``pytorch_lightning``), so
    # its callback is a Callback of the Lightning 2.6 Trainer our CLI builds; it reports
    # ``monitor`` after every validation and raises TrialPruned, which ends the fit.
    from optuna_integration import PyTorchLightningPruningCallback

    return PyTorchLightningPruningCallback


try:
    _Base = _optuna_pruning_base()
except ImportError:  # the `sweep` extra is not installed: the spec parser says so
    import lightning as L

    _Base = L.Callback


class OptunaPruning(_Base):  # type: ignore[misc, valid-type]
    """Optuna's Lightning pruning callback, built from plain values so that a run's command
    line (``--trainer.callbacks+=``) can carry it: the trial is re-opened from the storage.

    Args:
        storage: the study's storage URL (``sqlite:///…/search.db``).
        study_name: the study.
        trial_id: the storage's id of this run's trial.
        monitor: the metric reported after every validation, e.g. ``val/acc``.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_id: int,
        monitor: str = "val/acc",
        pruner: dict[str, Any] | None = None,
    ) -> None:
        import optuna

        # the pruner is not kept in the storage: a study loaded without it would use Optuna's
        # default (MedianPruner) in should_prune()
        rule = make_pruner(
            SearchSpec(
                parameters={},
                n_trials=1,
                stage="",
                kind="",
                pruner=dict(pruner or {"name": "median"}),
            )
        )
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=rule)
        super().__init__(optuna.trial.Trial(study, trial_id), monitor=monitor)


# -- running the search ------------------------------------------------------------------------
def run_search(experiment: Any, teacher: dict[str, Any], teacher_dir: Path) -> dict[str, Any]:
    """Run (or resume) the spec's search; returns its summary (``markdown``, ``best`` …)."""
    import optuna
    from optuna.trial import TrialState

    from kd_lightning.experiment.launch import execute
    from kd_lightning.experiment.progress import read_history

    spec, out = experiment.spec, experiment.out
    search = parse_search(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = storage_url(out), spec.name
    study = optuna.create_study(
        storage=url,
        study_name=name,
        direction=search.direction,
        sampler=make_sampler(search),
        pruner=make_pruner(search),
        load_if_exists=True,
    )
    # One process drives a study (the experiment), so a trial still RUNNING when it starts
    # was cut short by a kill: fail it and queue its parameters again. (Optuna's heartbeat +
    # RetryFailedTrialCallback does the same, but only after a grace period has passed.)
    # A trial killed before it sampled has no parameters: it is failed, and the sampler
    # draws a fresh trial in its place (queueing {} would only repeat the sampler's draw).
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        stale = out / f"{search.stage}-trial{t.number}"
        if stale.exists():
            shutil.rmtree(stale)
        again = "its parameters are queued again" if t.params else "it had not sampled yet"
        print(f"[{name}] search: trial {t.number} was cut short; {again}", flush=True)
    base = next(s for _, s in spec.stages()[1:] if s.name == search.stage)
    merged = stage_config(spec, base)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)

    def n_finished() -> int:
        return len(study.get_trials(deepcopy=False, states=finished))

    def objective(trial: optuna.trial.Trial) -> float:
        stage = Stage(
            name=f"{base.name}-trial{trial.number}",
            configs=list(base.configs),
            overrides=copy.deepcopy(base.overrides),
            # a token-store stage's trials read the store filled for the stage itself
            token_store=None if base.token_store is None
            else {**base.token_store, "path": str(experiment.token_store_path(base))},
        )
        values = {key: _suggest(trial, key, dist) for key, dist in search.parameters.items()}
        for key, value in values.items():
            set_dotted(stage.overrides, merged, key, value, f"search.parameters.{key}")
        experiment.loggers[stage.name] = experiment.loggers[base.name]  # same configs, same logger
        run_dir = experiment._run_dir(stage, search.seed)
        trial.set_user_attr("run_dir", str(run_dir.relative_to(out)))
        pruning = {
            "class_path": f"{OptunaPruning.__module__}.{OptunaPruning.__qualname__}",
            "init_args": {
                "storage": url,
                "study_name": name,
                "trial_id": trial._trial_id,
                "monitor": search.metric,
                "pruner": search.pruner,
            },
        }
        planned = experiment._student_job(
            search.kind,
            stage,
            search.seed,
            teacher,
            teacher_dir,
            [f"--trainer.callbacks+={json.dumps(pruning)}"],
        )
        t0 = time.perf_counter()
        tag = f"[{name}] search trial {trial.number} ({n_finished() + 1}/{search.n_trials})"
        print(f"{tag}: {values}", flush=True)
        try:
            record = planned if isinstance(planned, dict) else execute(planned)
        except optuna.TrialPruned:
            epochs = read_history(run_dir / "history.jsonl")
            print(
                f"{tag}: pruned after {len(epochs)} epoch(s)  [{time.perf_counter() - t0:.1f} s]",
                flush=True,
            )
            raise
        epochs = read_history(run_dir / "history.jsonl")
        history = [h[search.metric] for h in epochs if search.metric in h]
        if not history:
            logged = sorted({k for h in epochs for k in h} - {"epoch", "step"})
            raise ConfigError(
                "search.metric", search.metric, f"the trial never logged it; the runs log {logged}"
            )
        value = max(history) if search.direction == "maximize" else min(history)
        trial.set_user_attr("test_acc_best", record.get("test_acc_best"))
        trial.set_user_attr("test_acc_last", record.get("test_acc_last"))
        print(f"{tag}: {search.metric} {value:.4f}  [{time.perf_counter() - t0:.1f} s]", flush=True)
        return value

    left = search.n_trials - n_finished()
    if left > 0:
        print(
            f"[{name}] search: {n_finished()}/{search.n_trials} trials finished before; "
            f"running {left} more (study {url.removeprefix('sqlite:///')})",
            flush=True,
        )
        from kd_lightning.experiment.runner import _quiet_lightning

        with _quiet_lightning():
            while n_finished() < search.n_trials:
                study.optimize(objective, n_trials=1, catch=())
    return summarise(study, search, out)


def _suggest(trial: Any, key: str, dist: dict[str, Any]) -> Any:
    if dist["type"] == "categorical":
        return trial.suggest_categorical(key, dist["choices"])
    kwargs = {"log": bool(dist.get("log", False))}
    if dist.get("step") is not None:
        kwargs["step"] = dist["step"]
    if dist["type"] == "int":
        return trial.suggest_int(key, dist["low"], dist["high"], **kwargs)
    return trial.suggest_float(key, float(dist["low"]), float(dist["high"]), **kwargs)


def summarise(study: Any, search: SearchSpec, out: Path) -> dict[str, Any]:
    """search.json (every trial) and a Markdown table of the trials and the best parameters."""
    from optuna.trial import TrialState

    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            **{
                k: t.user_attrs.get(k)
                for k in ("run_dir", "test_acc_best", "test_acc_last", "retry_of")
            },
        }
        for t in study.get_trials(deepcopy=False)
    ]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params}
    summary = {
        "study": study.study_name,
        "metric": search.metric,
        "direction": search.direction,
        "n_trials": search.n_trials,
        "best": best,
        "trials": trials,
        "n_complete": len(complete),
        "n_pruned": sum(t["state"] == TrialState.PRUNED.name for t in trials),
        "n_failed": sum(t["state"] == TrialState.FAIL.name for t in trials),
    }
    (out / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = list(search.parameters)
    lines = [
        f"### Search over `{search.stage}`: {search.direction} {search.metric} "
        f"(best over epochs), {summary['n_complete']} complete, {summary['n_pruned']} pruned, "
        f"{summary['n_failed']} failed of {search.n_trials}",
        "",
        "| trial | state | "
        + " | ".join(f"`{k}`" for k in keys)
        + f" | {search.metric} | test acc, best-val ckpt (%) |",
        "|---|---|" + "---|" * (len(keys) + 2),
    ]
    for t in trials:
        value = "—" if t["value"] is None else f"{t['value']:.4f}"
        acc = "—" if t["test_acc_best"] is None else f"{100 * t['test_acc_best']:.2f}"
        cells = [_short(t["params"].get(k)) for k in keys]
        lines.append(
            f"| {t['number']} | {t['state'].lower()} | "
            + " | ".join(cells)
            + f" | {value} | {acc} |"
        )
    if best:
        shown = ", ".join(f"`{k}` = {_short(v)}" for k, v in best["params"].items())
        lines += ["", f"Best: trial {best['number']}, {search.metric} {best['value']:.4f}: {shown}"]
    summary["markdown"] = "\n".join(lines) + "\n"
    return summary


def _short(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
