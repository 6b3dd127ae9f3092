"""The experiment file: which runs make up a results table, and how to launch each one.

An experiment is a teacher, a from-scratch student baseline and one or more KD students,
the students each over ``seeds``. Every run is an ordinary ``kd-lightning fit`` built from
config files (``-c``) plus an ``overrides`` fragment in the same YAML layout, so whatever
works on the command line works here. See ``configs/experiments/quickstart.yaml``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from kd_lightning.errors import ConfigError
from kd_lightning.preflight import parse_or_config_error


@dataclass
class Stage:
    """One row of the results table: a student recipe, trained once per seed.

    Args:
        name: the row's name; also its run folder (``<output_dir>/<name>/seed<k>``).
        configs: kd-lightning config files, applied in order after the experiment's ``base``.
        overrides: a config fragment in the same YAML layout as the files, applied last,
            e.g. ``{model: {init_args: {heads: [...]}}}`` or ``{trainer: {max_epochs: 20}}``.
        token_store: a causal-LM KD stage that reads its teacher from a top-k token store
            (``LMDistillationModule(token_store=...)``): ``{k: 32}`` makes the experiment fill
            the store from *its own* teacher's checkpoint after the teacher run and before
            this stage's first seed (``kd-lightning data store-teacher`` on this stage's
            configs), and hands its path to every seed as ``model.init_args.token_store``.
            Keys: ``k`` (tokens per completion token, default 32), ``value_dtype`` (float16 |
            float32), ``path`` (default ``<output_dir>/<name>/token_store``), ``batch_size``,
            ``stages`` (default ``train,val``). A store written for another teacher or other
            settings is rewritten (and this stage's runs re-run); a finished matching one is
            reused. See ``Experiment._fill_token_store``.
    """

    name: str
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    token_store: dict[str, Any] | None = None


@dataclass
class TeacherStage:
    """The teacher: trained once (one seed), or an existing checkpoint that is only tested.

    Args:
        name: the row's name and run folder.
        configs: config files of a ClassifierModule run (after the experiment's ``base``).
        overrides: a config fragment applied last.
        checkpoint: an existing ClassifierModule ``.ckpt`` to reuse instead of training; it is
            tested with the experiment's data so the table still has the teacher's row.
        seed: the teacher run's ``seed_everything``.
    """

    name: str = "teacher"
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    seed: int = 0


@dataclass
class ExperimentSpec:
    """A whole experiment; see the module docstring and the README section "Experiments"."""

    name: str
    teacher: TeacherStage
    #: None: no from-scratch baseline (a search or a sweep over KD settings only)
    scratch: Stage | None
    kd: list[Stage]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str | None = None
    base: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    logger: str | None = None
    online: bool = False
    args: list[str] = field(default_factory=list)
    plots: bool = True
    #: re-run a finished run whose arguments or config files changed (its old results are
    #: deleted); without it such a run is refused, and unchanged finished runs are skipped
    overwrite: bool = False
    #: stage name → the published top-1 accuracy (%) it reproduces, shown beside ours
    published: dict[str, float | None] = field(default_factory=dict)
    #: where ``published`` comes from and which number it is (last / best epoch …)
    published_source: str | None = None
    #: the experiment file's folder: relative config paths are also looked up from here
    #: and its parents (set by ``parse_spec``, not by the user)
    source_dir: str | None = None
    #: where runs execute: sequential | local | slurm | submitit_local (kd_lightning.experiment.launch)
    launcher: str = "sequential"
    #: runs at once (local: worker processes; submitit: jobs in flight)
    parallel: int | None = None
    #: submitit/Slurm parameters: partition, timeout_min, gpus_per_node, cpus_per_task, mem_gb …
    slurm: dict[str, Any] = field(default_factory=dict)
    #: submitit only: runs that share one job (one start-up, one queue wait)
    runs_per_job: int = 1
    #: which stage kinds the grid multiplies: kd and/or scratch
    grid_stages: list[str] = field(default_factory=lambda: ["kd"])
    #: the grid as given (the W&B sweep export reads it back)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    #: an Optuna search over one stage (kd_lightning.experiment.search.SearchSpec fields)
    search: dict[str, Any] | None = None
    #: the scratch stages after the grid (empty: ``[scratch]``)
    scratch_grid: list[Stage] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir or f"runs/experiments/{self.name}")

    def scratch_stages(self) -> list[Stage]:
        return self.scratch_grid or ([self.scratch] if self.scratch is not None else [])

    def stages(self) -> list[tuple[str, Stage | TeacherStage]]:
        """(kind, stage) in run order: teacher, scratch, then each KD variant."""
        return [("teacher", self.teacher), *(("scratch", s) for s in self.scratch_stages()),
                *(("kd", s) for s in self.kd)]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="kd-lightning experiment",
        description="Train a teacher, a scratch student and KD students over seeds; write a "
        "results table (best-val, last and best-on-test epoch, mean ± std, beside the published "
        "numbers) and plots.",
        default_env=False,
        exit_on_error=False,
    )
    p.add_argument("-c", "--config", action=ActionConfigFile, help="the experiment YAML file")
    p.add_argument("--name", type=str, required=True, help="experiment name (W&B group)")
    p.add_argument("--teacher", type=TeacherStage, default=TeacherStage())
    p.add_argument("--scratch", type=Stage | None, default=None,
                   help="the from-scratch student baseline (omit it for a KD-only sweep)")
    p.add_argument("--kd", type=list[Stage], required=True)
    p.add_argument("--seeds", type=list[int], default=[0, 1, 2], help="student seeds")
    p.add_argument("--output_dir", type=str | None, default=None,
                   help="default: runs/experiments/<name>")
    p.add_argument("--base", type=list[str], default=[],
                   help="config files shared by every run (data, trainer), applied first")
    p.add_argument("--overrides", type=dict[str, Any], default={},
                   help="a config fragment applied to every run (before each stage's own)")
    p.add_argument("--logger", type=str | None, default=None,
                   help="a logger config file, e.g. configs/logger/wandb.yaml; default: CSV")
    p.add_argument("--online", type=bool, default=False,
                   help="W&B only: sync runs to the server (configs/logger/wandb.yaml is offline)")
    p.add_argument("--args", type=list[str], default=[],
                   help="raw kd-lightning flags appended last to every run, "
                   "e.g. '[--trainer.max_epochs=1]'")
    p.add_argument("--plots", type=bool, default=True, help="write PNG plots next to the results")
    p.add_argument("--overwrite", type=bool, default=False,
                   help="re-run (and replace) finished runs whose arguments or configs changed; "
                   "unchanged finished runs are still skipped")
    p.add_argument("--grid", type=dict[str, list[Any]], default={},
                   help="dotted config key → values: every KD stage runs once per combination "
                   "(key 'seeds' replaces the seeds), e.g. {model.init_args.temperature: [2, 4]}")
    p.add_argument("--grid_stages", type=list[str], default=["kd"],
                   help="stage kinds the grid multiplies: [kd], [scratch] or [scratch, kd]")
    p.add_argument("--search", type=dict[str, Any] | None, default=None,
                   help="an Optuna search over one stage: parameters, n_trials, metric, direction, "
                   "sampler, pruner (see docs/guide/experiments.md)")
    p.add_argument("--launcher", type=str, default="sequential",
                   help="sequential | local (parallel processes) | slurm (submitit) | "
                   "submitit_local (submitit's LocalExecutor, to try the Slurm path here)")
    p.add_argument("--parallel", type=int | None, default=None,
                   help="runs at once: local worker processes, or submitit jobs in flight")
    p.add_argument("--slurm", type=dict[str, Any], default={},
                   help="submitit parameters: partition, timeout_min, gpus_per_node, cpus_per_task, ...")
    p.add_argument("--runs_per_job", type=int, default=1,
                   help="submitit: runs that share one job (default 1)")
    p.add_argument("--published", type=dict[str, float | None], default={},
                   help="stage name → published top-1 (%%) it reproduces, shown beside ours")
    p.add_argument("--published_source", type=str | None, default=None,
                   help="where the published numbers come from and which epoch they report")
    return p


def parse_spec(argv: list[str]) -> ExperimentSpec:
    """Parse ``kd-lightning experiment`` arguments into a checked ``ExperimentSpec``."""
    cfg = parse_or_config_error(build_parser(), argv, "experiment").as_dict()
    files = cfg.pop("config", None) or []
    source = Path(str(files[-1])).resolve().parent if files else None
    spec = ExperimentSpec(
        name=cfg["name"],
        teacher=TeacherStage(**cfg["teacher"]),
        scratch=Stage(**cfg["scratch"]) if cfg["scratch"] else None,
        kd=[Stage(**s) for s in cfg["kd"]],
        seeds=list(cfg["seeds"]),
        output_dir=cfg["output_dir"],
        base=list(cfg["base"]),
        overrides=dict(cfg["overrides"] or {}),
        logger=cfg["logger"],
        online=cfg["online"],
        args=list(cfg["args"]),
        plots=cfg["plots"],
        overwrite=cfg["overwrite"],
        published=dict(cfg["published"] or {}),
        published_source=cfg["published_source"],
        source_dir=str(source) if source else None,
        launcher=cfg["launcher"],
        parallel=cfg["parallel"],
        slurm=dict(cfg["slurm"] or {}),
        runs_per_job=cfg["runs_per_job"],
        grid_stages=list(cfg["grid_stages"]),
        grid=dict(cfg["grid"] or {}),
        search=cfg["search"],
    )
    check_launch(spec)
    expand_grid(spec, dict(cfg["grid"] or {}))
    check_spec(spec)
    if spec.search is not None:
        from kd_lightning.experiment.search import parse_search

        parse_search(spec)  # every mistake in the block, before anything trains
    return spec


def check_launch(spec: ExperimentSpec) -> None:
    from kd_lightning.experiment.launch import LAUNCHERS

    if spec.launcher not in LAUNCHERS:
        raise ConfigError("launcher", spec.launcher, f"use one of {list(LAUNCHERS)}")
    if spec.parallel is not None and spec.parallel < 1:
        raise ConfigError("parallel", spec.parallel, "give a number of runs at once >= 1")
    if spec.runs_per_job < 1:
        raise ConfigError("runs_per_job", spec.runs_per_job, "give a number of runs >= 1")
    if spec.slurm and spec.launcher not in ("slurm", "submitit_local"):
        raise ConfigError("slurm", spec.slurm, "slurm parameters need launcher: slurm (or "
                          "submitit_local to try them here)")
    if spec.slurm:
        from kd_lightning.experiment.launch import slurm_parameters

        slurm_parameters(spec.slurm)
    bad = sorted(set(spec.grid_stages) - {"kd", "scratch"})
    if bad or not spec.grid_stages:
        raise ConfigError("grid_stages", spec.grid_stages, "list kd and/or scratch (a grid over "
                          "the teacher is one experiment per teacher: write one spec each)")


def expand_grid(spec: ExperimentSpec, grid: dict[str, list[Any]]) -> None:
    """Replace each KD (and, with ``grid_stages: [scratch, kd]``, scratch) stage by one stage
    per combination of ``grid`` values (in place).

    A stage ``kd`` with ``{model.init_args.optimizer.init_args.lr: [0.002, 0.004]}`` becomes
    ``kd-lr=0.002`` and ``kd-lr=0.004``, each with the value in its ``overrides``; ``seeds`` in
    the grid sets the seeds, so finished runs, the table and mean ± std work as for
    hand-written stages, and names stay the same from one invocation to the next. A numeric
    key part indexes a list (``model.init_args.heads.1.init_args.temperature``): the stage's
    list, read from its config files, is copied into the overrides with that one value changed
    (a config fragment replaces a whole list).
    """
    grid = dict(grid)
    if "seeds" in grid:
        seeds = grid.pop("seeds")
        if not isinstance(seeds, list) or not seeds:
            raise ConfigError("grid.seeds", seeds, "give a non-empty list of seeds")
        spec.seeds = [int(s) for s in seeds]
    for key, values in grid.items():
        if not values or not isinstance(values, list):
            raise ConfigError(f"grid.{key}", values, "give a non-empty list of values")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError("grid", key, "keys are dotted config keys, e.g. model.init_args.alpha")
    if not grid:
        return
    labels = grid_labels(list(grid))
    if "kd" in spec.grid_stages:
        spec.kd = [v for stage in spec.kd for v in _variants(spec, stage, grid, labels)]
    if "scratch" in spec.grid_stages and spec.scratch is not None:
        spec.scratch_grid = _variants(spec, spec.scratch, grid, labels)


def grid_labels(keys: list[str]) -> dict[str, str]:
    """The name part of each grid key: its last part, or the whole key where two collide."""
    def leaf(key: str) -> str:
        parts = [p for p in key.split(".") if not p.isdigit()]
        return parts[-1] if parts else key

    leaves = [leaf(k) for k in keys]
    return {k: (leaf(k) if leaves.count(leaf(k)) == 1 else k) for k in keys}


def _variants(spec: ExperimentSpec, stage: Stage, grid: dict[str, list[Any]],
              labels: dict[str, str]) -> list[Stage]:
    merged = stage_config(spec, stage)
    out = []
    for combo in itertools.product(*grid.values()):
        overrides = copy.deepcopy(stage.overrides)
        label = []
        for key, value in zip(grid, combo, strict=True):
            set_dotted(overrides, merged, key, value, f"grid.{key}")
            # a list or mapping value (a whole heads list …) is named by its position
            shown = value if isinstance(value, str | int | float | bool) else grid[key].index(value)
            label.append(f"{labels[key]}={shown}")
        out.append(Stage(name=f"{stage.name}-{'-'.join(label)}", configs=list(stage.configs),
                         overrides=overrides, token_store=copy.deepcopy(stage.token_store)))
    return out


def stage_config(spec: ExperimentSpec, stage: Stage | TeacherStage) -> dict[str, Any]:
    """The stage's config files and fragments merged as the CLI applies them (mappings merge,
    lists and values replace); only what a grid or search key needs to read lists from."""
    import yaml

    merged: dict[str, Any] = {}
    paths = [*spec.base, *stage.configs]
    for i, path in enumerate(paths):
        data = yaml.safe_load(resolve_path(spec, path, f"configs[{i}]").read_text())
        _merge(merged, data if isinstance(data, dict) else {})
    _merge(merged, copy.deepcopy(spec.overrides))
    _merge(merged, copy.deepcopy(stage.overrides))
    return merged


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def set_dotted(overrides: dict[str, Any], merged: dict[str, Any], key: str, value: Any,
               field_name: str) -> None:
    """Write ``value`` at dotted ``key`` into the ``overrides`` fragment (see ``expand_grid``)."""
    parts = key.split(".")
    node: Any = overrides
    ref: Any = merged
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = int(part) if part.isdigit() else -1
            if not 0 <= idx < len(node):
                raise ConfigError(field_name, value, f"{'.'.join(parts[:i])} has {len(node)} "
                                  f"entries: index {part} is not one of them")
            if last:
                node[idx] = value
                return
            node, ref = node[idx], ref[idx] if isinstance(ref, list) and idx < len(ref) else None
            continue
        if not isinstance(node, dict):
            raise ConfigError(field_name, value, f"{'.'.join(parts[:i])} is not a mapping here")
        if last:
            node[part] = value
            return
        ref_child = ref.get(part) if isinstance(ref, dict) else None
        if parts[i + 1].isdigit():  # a list: start from the stage's own (fragments replace lists)
            if not isinstance(node.get(part), list):
                if not isinstance(ref_child, list):
                    raise ConfigError(field_name, value, f"{'.'.join(parts[:i + 1])} is not a "
                                      "list in this stage's configs: fix the key")
                node[part] = copy.deepcopy(ref_child)
        else:
            node.setdefault(part, {})
        node, ref = node[part], ref_child


def check_spec(spec: ExperimentSpec) -> None:
    """Every mistake that can be caught before the first training step."""
    if not spec.name or "/" in spec.name:
        raise ConfigError("name", spec.name, "give a non-empty name without '/' (it names folders)")
    if not spec.seeds:
        raise ConfigError("seeds", spec.seeds, "give at least one seed, e.g. [0, 1, 2]")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("seeds", spec.seeds, "seeds repeat: each seed is one run, list it once")
    if not spec.kd and not spec.scratch_stages():
        raise ConfigError("kd", spec.kd, "give at least one KD stage")
    names = [s.name for _, s in spec.stages()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("kd", names, f"stage names {dupes} repeat: give each stage its own name")
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise ConfigError("kd.name", n, "stage names name folders: no '/', not empty")
    if spec.teacher.checkpoint is None and not spec.teacher.configs:
        raise ConfigError(
            "teacher", spec.teacher, "give teacher.configs (to train it) or teacher.checkpoint (to reuse one)"
        )
    if spec.teacher.checkpoint is not None:
        resolve_path(spec, spec.teacher.checkpoint, "teacher.checkpoint")
    for i, path in enumerate(spec.base):
        resolve_path(spec, path, f"base[{i}]")
    for field_name, stage in _named_stages(spec):
        for i, path in enumerate(stage.configs):
            resolve_path(spec, path, f"{field_name}.configs[{i}]")
        if isinstance(stage, Stage) and stage.token_store is not None:
            check_token_store(stage.token_store, f"{field_name}.token_store",
                              kind="scratch" if field_name == "scratch" else "kd")
    if spec.logger is not None:
        resolve_path(spec, spec.logger, "logger")
    unknown = sorted(set(spec.published) - set(names))
    if unknown:
        raise ConfigError("published", unknown, f"name stages of this experiment: {names}")
    for a in spec.args:
        if not a.startswith("--"):
            raise ConfigError("args", a, "each entry is one flag such as --trainer.max_epochs=1")


#: a stage's ``token_store`` keys and their defaults
TOKEN_STORE_DEFAULTS: dict[str, Any] = {
    "k": 32, "value_dtype": "float16", "path": None, "batch_size": 64, "stages": "train,val",
}


def check_token_store(settings: Any, field_name: str, kind: str = "kd") -> dict[str, Any]:
    """A stage's ``token_store`` block with its defaults filled in, or a ``ConfigError``."""
    if kind != "kd":
        raise ConfigError(field_name, settings, "only a KD stage reads a teacher's token store")
    if not isinstance(settings, dict):
        raise ConfigError(field_name, settings, "give a mapping, e.g. {k: 32}")
    unknown = sorted(set(settings) - set(TOKEN_STORE_DEFAULTS))
    if unknown:
        raise ConfigError(field_name, unknown, f"use the keys {list(TOKEN_STORE_DEFAULTS)}")
    out = {**TOKEN_STORE_DEFAULTS, **settings}
    for key in ("k", "batch_size"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ConfigError(f"{field_name}.{key}", out[key], "give a whole number >= 1")
    if out["value_dtype"] not in ("float16", "float32"):
        raise ConfigError(f"{field_name}.value_dtype", out["value_dtype"], "use float16 or float32")
    if not isinstance(out["stages"], str) or not out["stages"].strip():
        raise ConfigError(f"{field_name}.stages", out["stages"], "give e.g. 'train,val'")
    return out


def _named_stages(spec: ExperimentSpec) -> list[tuple[str, Stage | TeacherStage]]:
    return [("teacher", spec.teacher), *(("scratch", s) for s in spec.scratch_stages()),
            *((f"kd[{i}]", s) for i, s in enumerate(spec.kd))]


def resolve_path(spec: ExperimentSpec, path: str, field_name: str) -> Path:
    """A path as given, else relative to the experiment file's folder or one of its parents.

    So ``configs/quickstart/teacher.yaml`` inside ``configs/experiments/x.yaml`` works from
    the repository root, from a notebook folder or from any other working directory.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        if not p.exists():
            raise ConfigError(field_name, path, "no such file: fix the path")
        return p.resolve()
    if spec.source_dir:
        for folder in (Path(spec.source_dir), *Path(spec.source_dir).parents):
            if (folder / p).exists():
                return (folder / p).resolve()
    raise ConfigError(
        field_name, path,
        "no such file (looked in the working directory and beside the experiment file and its "
        "parents): fix the path",
    )
