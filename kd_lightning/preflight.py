"""Checks that run before a fit touches anything, and one-line errors for CLI typos.

* A log or checkpoint directory that cannot be written fails at the first save — after an
  epoch of work — and, for loggers, with a bare ``PermissionError``. ``check_run_dirs``
  probes every directory a fit will write to before the first step and names the config
  field to fix.
* jsonargparse answers a bad command line or config with a usage dump and a nested union
  error. ``CommandLine`` checks config files, YAML syntax and ``ckpt_path`` before the parse
  and expands list-index flags (``--model.init_args.heads.1.init_args.temperature=8``);
  when the parse still fails, ``diagnose`` walks the merged config against the classes'
  signatures and type hints and returns a ``ConfigError`` naming the first bad field.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import types
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import lightning as L
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.errors import ConfigError, closest


def ensure_writable(path: str | os.PathLike, field: str) -> None:
    """Create ``path`` if needed and write (then delete) a probe file in it."""
    target = Path(path)
    if "://" in str(path):  # remote (s3://, gs://, …): fsspec checks at the first save
        return
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".kd-write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            field, str(path),
            f"cannot write there ({err.strerror or err}); pick a directory you can write to",
        ) from None


def check_run_dirs(trainer: L.Trainer) -> None:
    """Probe every logger's ``save_dir`` and every checkpoint ``dirpath`` of ``trainer``.

    Field names follow the kd-lightning CLI (``trainer.logger…``, ``checkpoint.dirpath``).
    """
    loggers = trainer.loggers
    for i, logger in enumerate(loggers):
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            where = "trainer.logger" if len(loggers) == 1 else f"trainer.logger[{i}]"
            ensure_writable(save_dir, f"{where}.init_args.save_dir")
    for cb in trainer.callbacks:
        dirpath = getattr(cb, "dirpath", None)
        if dirpath:
            field = "checkpoint.dirpath" if isinstance(cb, ModelCheckpoint) else (
                f"{type(cb).__name__}.dirpath"
            )
            ensure_writable(dirpath, field)


# -- the command line: one-line errors from a structured check of the config ---------------
#
# jsonargparse reports a bad value deep inside a nested union error, after a usage dump.
# Instead of reading its message, ``check_command_line`` runs before the parse (config files,
# YAML syntax, ckpt_path), and ``diagnose`` re-checks the merged config field by field against
# the classes' signatures when the parse fails, so each error names the field and the fix.

#: ckpt_path values Lightning resolves itself (not files)
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
_CONFIG_FLAGS = ("-c", "--config")
_NO_VALUE_FLAGS = ("-h", "--help", "--print_config")
_CLASS_NAME = re.compile(r"(?:[A-Za-z_]\w*\.)*[A-Z]\w*")


@dataclass
class CommandLine:
    """A ``kd-lightning fit|validate|test|predict`` argv, split into what the checks need."""

    subcommand: str
    #: (flag, key, raw value) in order; key "" for -c/--config files, None for other tokens
    items: list[tuple[str, str | None, str]]

    @classmethod
    def split(cls, argv: Sequence[str]) -> CommandLine | None:
        if not argv or argv[0].startswith("-"):
            return None
        items: list[tuple[str, str | None, str]] = []
        args = list(argv[1:])
        i = 0
        while i < len(args):
            token = args[i]
            i += 1
            if not token.startswith("-") or token.split("=", 1)[0] in _NO_VALUE_FLAGS:
                items.append((token, None, ""))  # passed through unchanged
                continue
            flag, has_value, value = token.partition("=")
            if not has_value:
                if i >= len(args) or args[i].startswith("--"):
                    items.append((flag, flag.lstrip("-"), "true"))
                    continue
                value = args[i]
                i += 1
            key = "" if flag in _CONFIG_FLAGS else flag.lstrip("-")
            items.append((flag, key, value))
        return cls(argv[0], items)

    def join(self) -> list[str]:
        argv = [self.subcommand]
        for flag, key, value in self.items:
            if key is None:
                argv.append(flag)
            elif flag.startswith("--"):
                argv.append(f"{flag}={value}")
            else:  # `-c=file` would read as the value "=file"
                argv += [flag, value]
        return argv

    @property
    def config_files(self) -> list[str]:
        return [value for _, key, value in self.items if key == ""]


def load_config_file(path: str, field: str = "--config") -> dict[str, Any]:
    """A YAML config as a dict, or one ConfigError naming the file, the line and the fix."""
    file = Path(path)
    if not file.is_file():
        hint = closest(file.name, [p.name for p in file.parent.glob("*.y*ml")]) if file.parent.is_dir() else []
        raise ConfigError(field, path, "no such config file" + (
            f"; in {file.parent}/: {hint}" if hint else "; check the path (relative to the current directory)"
        ))
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(field, path, f"YAML syntax error{where}: {problem}; fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(field, path, f"cannot read the file ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(field, path, f"a config file holds a mapping (key: value), not a {type(data).__name__}")
    return data


def check_ckpt_path(value: str | None, field: str = "ckpt_path") -> None:
    """A ``ckpt_path`` that names a file must be a readable torch checkpoint (a zip archive)."""
    if not value or value in CKPT_KEYWORDS or value.startswith("registry") or "://" in value:
        return
    path = Path(value)
    if not path.exists():
        raise ConfigError(field, value, "no such file: give an existing .ckpt, or --ckpt_path=last to "
                          "resume the newest last.ckpt in checkpoint.dirpath")
    if path.is_dir():
        raise ConfigError(field, value, "that is a directory: give a .ckpt file inside it, or "
                          "--ckpt_path=last")
    try:  # torch.save writes a zip whose directory is at the end: a truncated file has none
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl")
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(field, value, f"the file is corrupt or truncated ({err}); pick another "
                          "checkpoint, e.g. --ckpt_path=last") from None


def _names_run(config: dict[str, Any]) -> bool:
    trainer = config.get("trainer")
    return bool((config.get("checkpoint") or {}).get("dirpath")
                or (isinstance(trainer, dict) and "logger" in trainer))


def name_stacked_run(line: CommandLine) -> CommandLine:
    """``fit -c base.yaml -c configs/kd/dkd.yaml``: when only an earlier file names the run
    (checkpoint folder, logger name), the run is named ``<name>+<stems of the later files>``,
    so a stacked head config neither logs as the base run nor takes its checkpoint folder.
    Flags that set either on the command line win, untouched."""
    files = line.config_files
    if line.subcommand != "fit" or len(files) < 2:
        return line
    if any(key and key.startswith(("checkpoint.dirpath", "trainer.logger")) for _, key, _ in line.items):
        return line
    naming = [i for i, f in enumerate(files) if _names_run(load_config_file(f))]
    if not naming or naming[-1] == len(files) - 1:
        return line
    suffix = "+".join(Path(f).stem for f in files[naming[-1] + 1:])
    merged = merged_config(line)
    extra: list[tuple[str, str | None, str]] = []
    dirpath = (merged.get("checkpoint") or {}).get("dirpath")
    if isinstance(dirpath, str):
        extra.append(("--checkpoint.dirpath", "checkpoint.dirpath", f"{dirpath}+{suffix}"))
    logger = (merged.get("trainer") or {}).get("logger")
    name = (logger.get("init_args") or {}).get("name") if isinstance(logger, dict) else None
    if isinstance(name, str):
        key = "trainer.logger.init_args.name"
        extra.append((f"--{key}", key, f"{name}+{suffix}"))
    return CommandLine(line.subcommand, [*line.items, *extra]) if extra else line


def merged_config(line: CommandLine) -> dict[str, Any]:
    """The config as the files and ``--key=value`` flags set it, in their order (later wins).

    A flag that addresses a list element (``--model.init_args.heads.1.init_args.temperature=8``)
    is applied here too; ``expand_index_flags`` hands it to jsonargparse as the whole list.
    """
    config: dict[str, Any] = {}
    for _, key, value in line.items:
        if key is None:
            continue
        if key == "":
            _deep_merge(config, load_config_file(value))
        elif key.endswith("+"):  # --trainer.callbacks+=Class appends one element
            _append(config, key[:-1].split("."), _yaml_value(value))
        else:
            _set(config, key.split("."), _yaml_value(value))
    return config


def _append(config: dict[str, Any], parts: list[str], value: Any) -> None:
    held = _get(config, parts)
    items = list(held) if isinstance(held, list) else [] if held is None else [held]
    items.append({"class_path": value} if isinstance(value, str) and _CLASS_NAME.fullmatch(value)
                 else value)
    _set(config, parts, items)


def expand_index_flags(line: CommandLine) -> CommandLine:
    """Rewrite each flag with a list index in its key as a flag that sets the whole list.

    jsonargparse has no syntax for one element of a list (``heads.1``); the merged list is
    equivalent at the flag's position because flags and files apply in order.
    """
    if not any(key and _index_of(key.split(".")) is not None for _, key, _ in line.items):
        return line
    config: dict[str, Any] = {}
    items: list[tuple[str, str | None, str]] = []
    for flag, key, value in line.items:
        if key is None:
            items.append((flag, key, value))
            continue
        if key == "":
            _deep_merge(config, load_config_file(value))
            items.append((flag, key, value))
            continue
        parts = key.split(".")
        _set(config, parts, _yaml_value(value), field=key)
        index = _index_of(parts)
        if index is None or key.endswith("+"):
            items.append((flag, key, value))
            continue
        list_key = ".".join(parts[:index])
        items.append((f"--{list_key}", list_key, json.dumps(_get(config, parts[:index]))))
    return CommandLine(line.subcommand, items)


def _index_of(parts: list[str]) -> int | None:
    return next((i for i, p in enumerate(parts) if p.isdigit()), None)


def _yaml_value(raw: str) -> Any:
    """A flag's value as jsonargparse reads it: YAML, or a config file for a group."""
    if raw.endswith((".yaml", ".yml")) and Path(raw).is_file():
        return load_config_file(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _deep_merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if "class_path" in value and value["class_path"] != base[key].get("class_path"):
                base[key] = dict(value)  # another class: its init_args start afresh
            else:
                _deep_merge(base[key], value)
        else:
            base[key] = value


def _step(node: Any, part: str) -> Any:
    """One key down a config; ``init_args`` may be left out, as jsonargparse allows."""
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    if not isinstance(node, dict):
        return None
    if part not in node and isinstance(node.get("init_args"), dict):
        return node["init_args"].get(part)
    return node.get(part)


def _get(config: dict[str, Any], parts: list[str]) -> Any:
    node: Any = config
    for part in parts:
        node = _step(node, part)
    return node


def _set(config: dict[str, Any], parts: list[str], value: Any, field: str = "") -> None:
    """Set ``parts`` (a dotted key split) to ``value``, creating dicts on the way."""
    node: Any = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list) and not part.isdigit():
            if not node:
                return
            node = node[-1]  # `--trainer.callbacks.step=5` after `callbacks+=`: the last one
        if isinstance(node, list):
            if int(part) >= len(node):
                raise ConfigError(field or ".".join(parts), value,
                                  f"{'.'.join(parts[:i])} has {len(node)} element(s): use an "
                                  f"index from 0 to {len(node) - 1}")
            if last:
                node[int(part)] = value
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            return  # a scalar addressed further down: jsonargparse reports it
        if part not in node and part != "class_path" and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if last:
            held = node.get(part)
            if isinstance(held, dict) and "class_path" in held and isinstance(value, str):
                node[part] = {"class_path": value}  # --model=pkg.Class replaces the class
            else:
                node[part] = value
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


# -- diagnosis: the first field of a merged config that does not fit its class --------------
#: a config group that names its class by class_path (``model``, ``data``): the base class
@dataclass(frozen=True)
class Subclass:
    base: type


def diagnose(config: dict[str, Any], schema: dict[str, Any]) -> ConfigError | None:
    """The first problem in ``config`` by ``schema`` (top-level key → annotation, a class
    whose ``__init__`` the group mirrors, or ``Subclass(base)``); None if none is found."""
    for key, value in config.items():
        if key not in schema:
            return ConfigError(key, value, f"no such option. Closest: {closest(key, schema) or sorted(schema)}")
        kind = schema[key]
        if isinstance(kind, Subclass):
            found = check_class_spec(key, value, (kind.base,))
        elif isinstance(kind, type) and isinstance(value, dict):
            found = check_kwargs(key, kind, value)
        else:
            found = check_value(key, value, kind)
        if found is not None:
            return found
    return None


def check_class_spec(field: str, spec: Any, bases: tuple[type, ...]) -> ConfigError | None:
    """A ``{class_path, init_args}`` value (or a bare class name) against ``bases``."""
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        return None  # init_args for the default class, or a non-class value: the type check
    path = spec["class_path"]
    cls = _import_class(path, bases)
    kinds = " or ".join(b.__name__ for b in bases)
    if cls is None:
        known = _public_subclasses(bases)
        short = {name.rsplit(".", 1)[-1]: name for name in known}
        nearest = [short[n] for n in closest(path.rsplit(".", 1)[-1], short)]
        return ConfigError(field, path, (
            f"no {kinds} can be imported from that class_path. Closest: {nearest or 'none'}; "
            "your own classes need a full import path (my_pkg.MyClass)"
        ))
    if not issubclass(cls, bases):
        return ConfigError(field, path, f"{cls.__name__} is not a {kinds}; use a subclass of {kinds}")
    args = {k: v for k, v in spec.items() if k not in ("class_path", "init_args", "dict_kwargs")}
    args.update(spec.get("init_args") or {})
    return check_kwargs(f"{field}.init_args", cls, args)


def check_kwargs(field: str, target: Callable[..., Any], args: dict[str, Any]) -> ConfigError | None:
    """Each of ``args`` is a parameter of ``target`` and fits its type hint."""
    params, open_kwargs = parameters(target)
    prefix = f"{field}." if field else ""
    name = getattr(target, "__name__", str(target))
    for key, value in args.items():
        if key not in params:
            if open_kwargs:
                continue
            return ConfigError(f"{prefix}{key}", value, (
                f"{name} takes no argument {key!r}. Closest: {closest(key, params) or 'none'}"
            ))
        found = check_value(f"{prefix}{key}", value, params[key])
        if found is not None:
            return found
    return None


def parameters(target: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """``target``'s parameters → type hints, and whether it still takes any keyword.

    A class's ``**kwargs`` are followed up its MRO (``KLDivergence(**kwargs)`` passes
    ``weight``/``schedule``/``name`` to ``LossHead``), as jsonargparse resolves them.
    """
    chain = [k.__init__ for k in target.__mro__ if "__init__" in vars(k)] if isinstance(
        target, type) else [target]
    found: dict[str, Any] = {}
    for func in chain:
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return found, True
        try:
            hints = get_type_hints(func)
        except Exception:  # an unresolvable forward reference: check names only
            hints = {}
        for name, param in sig.parameters.items():
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                found.setdefault(name, hints.get(name, param.annotation))
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return found, False
    return found, True


def check_value(field: str, value: Any, annotation: Any) -> ConfigError | None:
    """``value`` against a type hint: class specs are walked, leaves type-checked by jsonargparse."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    classes = _classes_in(annotation)
    if isinstance(value, dict) and "class_path" in value and classes:
        return check_class_spec(field, value, classes)
    if isinstance(value, dict) and "init_args" in value and classes and not _accepts(annotation, value):
        examples = _public_subclasses(classes)[:3]
        return ConfigError(f"{field}.init_args", value["init_args"],
                           f"{field} has no class yet: set {field}.class_path too, e.g. {examples}")
    if isinstance(value, list) and classes and any(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            found = check_value(f"{field}.{i}", item, annotation_of_items(annotation))
            if found is not None:
                return found
        return None
    records = [c for c in classes if dataclasses.is_dataclass(c)]
    if isinstance(value, dict) and records:
        return check_kwargs(field, records[0], value)
    if _accepts(annotation, value):
        return None
    if isinstance(value, str) and classes and _CLASS_NAME.fullmatch(value):
        return check_class_spec(field, value, classes)
    return ConfigError(field, value, f"expected {type_name(annotation)}")


def annotation_of_items(annotation: Any) -> Any:
    """``list[X] | None`` → X (the annotation one list element must fit)."""
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
            inner = get_args(arg)
            return inner[0] if inner else Any
    return annotation


def type_name(annotation: Any) -> str:
    """``int | None`` rather than ``typing.Optional[int]``; module paths dropped."""
    if annotation is type(None):
        return "None"
    if get_origin(annotation) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    text = str(annotation).replace("NoneType", "None").replace("typing.", "")
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)


def _accepts(annotation: Any, value: Any) -> bool:
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_argument("--value", type=annotation)
        parser.parse_object({"value": value})
    except Exception:
        return False
    return True


def _classes_in(annotation: Any) -> tuple[type, ...]:
    """The non-builtin classes an annotation names, at any depth (``Callable[..., Optimizer]``
    gives Optimizer): the bases a class_path for that field must subclass."""
    found: list[type] = []
    stack = [annotation]
    while stack:
        item = stack.pop()
        args = get_args(item)
        if get_origin(item) is collections.abc.Callable and args:
            stack.append(args[-1])  # a factory: the class it returns, not its parameters
        elif args:
            stack.extend(args)
        elif isinstance(item, type) and item.__module__ not in ("builtins", "collections.abc", "typing"):
            found.append(item)
    return tuple(dict.fromkeys(found))


def _import_class(path: str, bases: tuple[type, ...]) -> type | None:
    if "." not in path:  # a short name, resolved among the imported subclasses as jsonargparse does
        return next((c for c in _subclasses(bases) if c.__name__ == path), None)
    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def _subclasses(bases: tuple[type, ...]) -> list[type]:
    found: list[type] = []
    stack = list(bases)
    while stack:
        cls = stack.pop()
        if cls not in found:
            found.append(cls)
            stack.extend(cls.__subclasses__())
    return found


def _public_subclasses(bases: tuple[type, ...]) -> list[str]:
    """Import paths of the loaded, public, concrete subclasses, by their shortest module path
    (``torch.optim.Adam``, not ``torch.optim.adam.Adam``)."""
    names: set[str] = set()
    for cls in _subclasses(bases):
        if cls.__name__.startswith("_") or inspect.isabstract(cls) or "test" in cls.__module__:
            continue
        parts = cls.__module__.split(".")
        module = next((".".join(parts[:k]) for k in range(1, len(parts) + 1)
                       if getattr(sys.modules.get(".".join(parts[:k])), cls.__name__, None) is cls),
                      cls.__module__)
        if not any(p.startswith("_") for p in module.split(".")):
            names.add(f"{module}.{cls.__name__}")
    return sorted(names)


def parse_or_config_error(parser: ArgumentParser, argv: Sequence[str], command: str,
                          target: Callable[..., Any] | None = None) -> Any:
    """``parser.parse_args(argv)`` for a subcommand with its own jsonargparse parser
    (``compress``, ``experiment``): config files checked first, and a failed parse raised
    as one ConfigError — the bad parameter of ``target`` if one is found.

    ``parser`` must be built with ``exit_on_error=False``.
    """
    line = CommandLine.split([command, *argv])
    for path in line.config_files if line is not None else []:
        load_config_file(path)
    try:
        return parser.parse_args(list(argv))
    except ArgumentError as err:
        message = str(err)
    if line is not None and target is not None:
        config = merged_config(line)
        config.pop("config", None)
        found = check_kwargs("", target, config)
        if found is not None:
            raise found from None
    first = next((s.strip() for s in message.splitlines() if s.strip()), message)
    raise ConfigError("command line", first, f"see `kd-lightning {command} --help`") from None
