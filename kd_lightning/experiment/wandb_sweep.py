"""``kd-lightning experiment -c spec.yaml --export-wandb-sweep sweep.yaml``: the spec's grid
(``method: grid``) or search (``method: bayes``) as a W&B sweep whose command is our ``fit``.

Then ``wandb sweep sweep.yaml`` and ``wandb agent <id>`` run it; the agent replaces
``${args}`` by ``--<parameter>=<value>`` flags, which ``kd-lightning fit`` reads like any
other ``--key=value`` flag. The command carries the stage's config files, the experiment's
overrides (written beside the sweep file) and the experiment's teacher checkpoint, so train
the teacher first (``kd-lightning experiment`` does) or give ``teacher.checkpoint``.
Keys of the sweep configuration: https://docs.wandb.ai/guides/sweeps/sweep-config-keys
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.errors import ConfigError
from kd_lightning.experiment.spec import (
    ExperimentSpec,
    _merge,
    resolve_path,
    set_dotted,
    stage_config,
)

#: the top-level keys W&B documents for a sweep configuration
SWEEP_KEYS = (
    "program",
    "name",
    "description",
    "method",
    "metric",
    "parameters",
    "early_terminate",
    "command",
    "run_cap",
    "project",
    "entity",
)


def export_wandb_sweep(
    spec: ExperimentSpec, grid: dict[str, list[Any]], path: str | Path, out_dir: Path
) -> Path:
    """Write the sweep YAML (and its overrides fragment) and return its path."""
    path = Path(path)
    search = None
    if spec.search is not None:
        from kd_lightning.experiment.search import parse_search

        search = parse_search(spec)
    if not grid and search is None:
        raise ConfigError("grid", grid, "a W&B sweep needs a grid: or search: block in the spec")
    stage = next(s for k, s in spec.stages()[1:] if s.name == search.stage) if search else None
    kind = search.kind if search else "kd"
    if stage is None:
        # every grid variant has its base stage's configs; the sweep's flags set the grid keys
        if not spec.kd:
            raise ConfigError("kd", spec.kd, "the sweep runs a KD stage: give one")
        stage = spec.kd[0]
    merged = stage_config(spec, stage)
    params = (
        _grid_parameters(grid, merged) if search is None else _search_parameters(search, merged)
    )
    fragment: dict[str, Any] = {}
    _merge(fragment, copy.deepcopy(spec.overrides))
    _merge(fragment, copy.deepcopy(stage.overrides))
    command: list[str] = ["${env}", "kd-lightning", "fit"]
    files = [*spec.base, *stage.configs, *([spec.logger] if spec.logger else [])]
    for i, f in enumerate(files):
        command += ["-c", _shown(resolve_path(spec, f, f"configs[{i}]"), path.parent)]
    if fragment:
        frag_path = path.with_name(f"{path.stem}.overrides.yaml")
        frag_path.parent.mkdir(parents=True, exist_ok=True)
        frag_path.write_text(yaml.safe_dump(fragment, sort_keys=False))
        command += ["-c", _shown(frag_path.resolve(), path.parent)]
    if kind == "kd":
        teacher = (
            resolve_path(spec, spec.teacher.checkpoint, "teacher.checkpoint")
            if spec.teacher.checkpoint
            else out_dir
            / spec.teacher.name
            / f"seed{spec.teacher.seed}"
            / "checkpoints"
            / "best.ckpt"
        )
        command.append(
            "--model.init_args.teacher="
            + json.dumps({"checkpoint": _shown(Path(teacher).resolve(), path.parent)})
        )
    if (
        spec.logger
        and str(
            (yaml.safe_load(resolve_path(spec, spec.logger, "logger").read_text()) or {})
            .get("trainer", {})
            .get("logger", "")
        ).find("WandbLogger")
        >= 0
    ):
        command.append(f"--trainer.logger.init_args.group={spec.name}")  # as the experiment's runs
    command += ["--test_after_fit=true", "${args}"]
    sweep: dict[str, Any] = {
        "program": "kd-lightning",
        "name": spec.name,
        "description": f"kd-lightning experiment {spec.name}",
        "method": "grid" if search is None else "bayes",
        "parameters": params,
        "command": command,
    }
    if search is not None:
        sweep["metric"] = {"name": search.metric, "goal": search.direction}
        sweep["run_cap"] = search.n_trials
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# W&B sweep of kd-lightning experiment {spec.name!r} (kd-lightning experiment "
        "--export-wandb-sweep).\n# Paths are relative to the folder it was exported from: "
        "run `wandb agent` there.\n" + yaml.safe_dump(sweep, sort_keys=False)
    )
    return path


def _shown(p: Path, folder: Path) -> str:
    """``p`` relative to the working directory (where ``wandb agent`` runs), if inside it."""
    return os.path.relpath(p, Path.cwd()) if p.is_relative_to(Path.cwd()) else str(p)


def _list_root(key: str) -> str | None:
    """``a.b.1.c`` → ``a.b`` (the list a numeric part indexes), else None."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i])
    return None


def _grid_parameters(grid: dict[str, list[Any]], merged: dict[str, Any]) -> dict[str, Any]:
    """Scalar keys as ``values``; keys into a list as whole lists (JSON text) per combination,
    since a ``--a.b.1.c=`` flag does not exist (fragments and flags replace whole lists)."""
    params: dict[str, Any] = {}
    grid = dict(grid)
    if "seeds" in grid:
        params["seed_everything"] = {"values": [int(s) for s in grid.pop("seeds")]}
    roots: dict[str, list[str]] = {}
    for key, values in grid.items():
        root = _list_root(key)
        if root is None:
            params[key] = {"values": [_flag_value(v) for v in values]}
        else:
            roots.setdefault(root, []).append(key)
    for root, keys in roots.items():
        values = []
        for combo in itertools.product(*(grid[k] for k in keys)):
            fragment: dict[str, Any] = {}
            for key, value in zip(keys, combo, strict=True):
                set_dotted(fragment, merged, key, value, f"grid.{key}")
            node: Any = fragment
            for part in root.split("."):
                node = node[part]
            values.append(json.dumps(node))
        params[root] = {"values": values}
    return params


def _search_parameters(search: Any, merged: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, dist in search.parameters.items():
        if _list_root(key) is not None:
            if dist["type"] != "categorical":
                raise ConfigError(
                    f"search.parameters.{key}",
                    dist,
                    "a W&B sweep cannot set one "
                    "entry of a list from a distribution: give it as categorical "
                    "choices, or search a key outside the list",
                )
            values = []
            for choice in dist["choices"]:
                fragment: dict[str, Any] = {}
                set_dotted(fragment, merged, key, choice, f"search.parameters.{key}")
                node: Any = fragment
                for part in _list_root(key).split("."):
                    node = node[part]
                values.append(json.dumps(node))
            params[_list_root(key)] = {"values": values}
        elif dist["type"] == "categorical":
            params[key] = {"values": [_flag_value(v) for v in dist["choices"]]}
        else:
            low, high = dist["low"], dist["high"]
            if dist["type"] == "int":
                name = "int_uniform" if not dist.get("log") else "q_log_uniform_values"
            else:
                name = "log_uniform_values" if dist.get("log") else "uniform"
            entry = {"distribution": name, "min": low, "max": high}
            if dist.get("step") is not None:
                entry["distribution"] = "q_uniform"
                entry["q"] = dist["step"]
            elif name == "q_log_uniform_values":
                entry["q"] = 1
            params[key] = entry
    if search.seed is not None:
        params["seed_everything"] = {"value": search.seed}
    return params


def _flag_value(v: Any) -> Any:
    """Scalars as they are; lists and mappings as JSON text (the agent formats ``str(v)``)."""
    return v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)
