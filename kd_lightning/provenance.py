"""Where a result came from: the command, the commit, the configs and the machine.

Every result file (experiment tables, benchmark JSON, the heads' quickstart CSV) records
``provenance(...)``, so its own command reproduces it on the code it names, and the docs can
flag a result whose config files changed since it was written (``stale_configs``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kd_lightning.machine import machine_info
from kd_lightning.tracking import git_revision

REPO = Path(__file__).resolve().parents[1]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def config_hash(resolved: Any) -> str:
    """sha256 of a resolved config (any JSON-able value), independent of key order."""
    text = json.dumps(resolved, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _repo_relative(path: str | Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:  # a config outside the checkout: its name only, never a machine path
        return p.name


def provenance(
    command: str | Sequence[str] | None = None,
    config_files: Iterable[str | Path] = (),
    resolved_config: Any = None,
) -> dict[str, Any]:
    """The record a result file carries.

    Args:
        command: the command line that wrote the result (default: this process's argv,
            as ``kd-lightning ...`` when run through the console script).
        config_files: the YAML files the command read; each is hashed, so a later edit
            shows (``stale_configs``).
        resolved_config: the fully resolved configuration; its hash is recorded.
    """
    if command is None:
        argv = list(sys.argv)
        argv[0] = "kd-lightning" if Path(argv[0]).name in ("kd-lightning", "__main__.py") else argv[0]
        command = argv
    if not isinstance(command, str):
        command = shlex.join(str(a) for a in command)
    files = {_repo_relative(p): file_sha256(p) for p in config_files if Path(p).is_file()}
    record: dict[str, Any] = {
        "command": command,
        **git_revision(),
        "config_files": files,
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if resolved_config is not None:
        record["resolved_config_sha256"] = config_hash(resolved_config)
    return record


def stale_configs(record: dict[str, Any], root: Path = REPO) -> list[str]:
    """The recorded config files that changed (or vanished) since the result was written."""
    changed = []
    for rel, digest in (record.get("config_files") or {}).items():
        path = root / rel
        if not path.is_file() or file_sha256(path) != digest:
            changed.append(rel)
    return changed
