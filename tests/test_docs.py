"""Docs that cannot rot: the site builds in strict mode, offline, and every command shown in
a ``bash`` block of README.md or docs/**/*.md is exercised.

The command harness is generic: each block is split into simple commands, and each command
is dispatched on its program. ``kd-lightning fit|validate|test|predict`` is parsed with
``--print_config`` (the README's quickstart fits also run for real, with debug limits, so
the checkpoints later commands name exist); the other subcommands are parsed by their own
parser without running; ``pip``, ``pytest``, ``mkdocs`` and ``ruff`` lines are checked
structurally. A program the harness does not know fails the test, so no command enters the
docs untested. Code blocks with a ``title="file"`` are written to the working directory
first, so a page's ``-c cos.yaml`` finds the YAML the page shows.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib

from kd_lightning.cli import EXTRA_COMMANDS, RUN_COMMANDS, main
from kd_lightning.errors import ConfigError
from tests.conftest import DEBUG_TRAINER, REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```", re.M | re.S)
SHELLS = ("bash", "sh", "shell", "console")
TITLE = re.compile(r'title="(?P<name>[^"]+)"')
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*")
#: the README's quickstart: run for real (debug limits) before anything is parsed
EXERCISED: set[tuple[str, ...]] = set()
QUICKSTART = (["fit", "-c", "configs/quickstart/teacher.yaml"],
              ["fit", "-c", "configs/quickstart/kd.yaml"])


@dataclass
class Page:
    path: Path
    commands: list[list[str]] = field(default_factory=list)  # simple commands, as argv
    files: dict[str, str] = field(default_factory=dict)  # titled code blocks

    @property
    def name(self) -> str:
        return str(self.path.relative_to(REPO))


def read_page(path: Path) -> Page:
    page = Page(path)
    for block in FENCE.finditer(path.read_text()):
        info, body = block["info"].strip(), block["body"]
        title = TITLE.search(info)
        if title:
            page.files[title["name"]] = body
        if info.split(" ")[0] in SHELLS:
            page.commands += simple_commands(body)
    return page


def simple_commands(script: str) -> list[list[str]]:
    """``a && b; c | d`` and ``\\``-continued lines → [[a...], [b...], ...]; comments dropped;
    ``VAR=value`` lines set variables that later ``$VAR`` / ``${VAR}`` read."""
    commands: list[list[str]] = []
    variables: dict[str, str] = {}
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(VARIABLE.sub(lambda m: variables.get(m[1] or m[2], "x"), token))
        commands.append(current)
        if len(current) == 1 and ASSIGNMENT.fullmatch(current[0]):
            name, _, value = commands.pop()[0].partition("=")
            variables[name] = value
    return [c for c in commands if c]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory with the repo's configs, where the README's quickstart ran (debug
    limits), so ``runs/quickstart/.../best.ckpt`` exists for the commands that read it."""
    work = tmp_path_factory.mktemp("docs_commands")
    (work / "configs").symlink_to(REPO / "configs")
    with _chdir(work):
        for argv in QUICKSTART:
            main([*argv, *DEBUG_TRAINER])
    return work


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    import os

    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# -- the dispatcher ---------------------------------------------------------------------------
def exercise(argv: list[str], work: Path) -> str:
    """Exercise one simple command; returns what was done. AssertionError if it fails."""
    env = {}
    while argv and ASSIGNMENT.fullmatch(argv[0]):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    while argv and argv[0] in ("srun", "time", "nice", "exec"):  # launchers: the command after
        argv = argv[1:]
        while argv and (argv[0].startswith("-") or argv[0].isdigit()):
            argv = argv[1:]
    assert argv, "an empty command"
    program, args = argv[0], argv[1:]
    if program == "kd-lightning":
        return kd_lightning(args, env, work)
    if program in ("python", "python3") and args[:2] == ["-m", "kd_lightning"]:
        return kd_lightning(args[2:], env, work)
    if program == "torchrun":
        assert "-m" in args and args[args.index("-m") + 1] == "kd_lightning", argv
        return kd_lightning(args[args.index("-m") + 2:], env, work)
    if program == "sbatch":  # a batch script that passes its arguments to `kd-lightning fit`
        assert (REPO / args[0]).is_file() and "kd-lightning fit" in (REPO / args[0]).read_text()
        return kd_lightning(["fit", *args[1:]], env, work)
    checks: dict[str, Callable[[list[str]], str]] = {
        "python": python, "python3": python, "pip": pip, ".": activate, "source": activate,
        "mkdocs": mkdocs, "ruff": ruff, "pytest": lambda a: python(["-m", "pytest", *a]),
    }
    assert program in checks, (
        f"the docs harness cannot exercise {program!r}: add a check for it in tests/test_docs.py "
        "or show the command differently"
    )
    return checks[program](args)


def kd_lightning(args: list[str], env: dict[str, str], work: Path) -> str:
    assert args, "kd-lightning without a subcommand"
    sub = args[0]
    if env.get("PYTHONPATH") == ".":
        sys.path.insert(0, str(work))
    if sub in RUN_COMMANDS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
            main([*args, "--print_config"])
        assert info.value.code == 0, out.getvalue()[-2000:]
        assert "model:" in out.getvalue()
        return f"parsed {sub}"
    assert sub in EXTRA_COMMANDS, f"unknown subcommand {sub!r}"
    dry_parse(lambda: main(args))
    return f"parsed {sub}"


class Parsed(Exception):
    """Raised by ``dry_parse`` once the command's own parser accepted its arguments."""


def dry_parse(run: Callable[[], object]) -> None:
    """Run a command's entry point up to its argument parse, and stop there: the outermost
    ``parse_args`` of any argparse/jsonargparse parser parses for real, then raises Parsed."""
    import argparse

    import jsonargparse

    depth = [0]
    patched = {}
    # parse_known_args too: a command that takes dotted overrides parses with it
    for cls, method in [(c, m) for c in (argparse.ArgumentParser, jsonargparse.ArgumentParser)
                        for m in ("parse_args", "parse_known_args") if m in vars(c)]:
        real = getattr(cls, method)
        patched[(cls, method)] = real

        def parse(self, *a, _real=real, **kw):
            depth[0] += 1
            try:
                result = _real(self, *a, **kw)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise Parsed
            return result

        setattr(cls, method, parse)
    try:
        with pytest.raises(Parsed):
            run()
    finally:
        for (cls, method), real in patched.items():
            setattr(cls, method, real)


def python(args: list[str]) -> str:
    if args[:2] == ["-m", "venv"]:
        return "venv"
    if args[:2] == ["-m", "pytest"]:
        opts = args[2:]
        if "-n" in opts:
            importlib.import_module("xdist")  # the dev extra installs pytest-xdist
        for arg in opts:
            if not arg.startswith("-") and "/" in arg:
                assert (REPO / arg.split("::")[0]).exists(), arg
        return "pytest"
    if args and args[0] == "-c":
        compile(args[1], "<docs>", "exec")
        return "python -c"
    if args[:1] == ["-m"]:  # a module of this repo with a main(): parse its arguments only
        module = importlib.import_module(args[1])
        with _argv([args[1], *args[2:]]):
            dry_parse(module.main)
        return f"parsed {args[1]}"
    assert args and args[0].endswith(".py"), f"cannot exercise python {args}"
    script = REPO / args[0]
    assert script.is_file(), args[0]
    spec = importlib.util.spec_from_file_location(f"docs_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a script's work sits under `if __name__ == "__main__"`
    assert hasattr(module, "main"), f"{args[0]} has no main() whose arguments could be parsed"
    with _argv([args[0], *args[1:]]):
        dry_parse(module.main)
    return f"parsed {args[0]}"


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    before = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = before


def pip(args: list[str]) -> str:
    assert args[0] == "install", args
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    opts = iter(args[1:])
    for arg in opts:
        if arg in ("-c", "-r"):
            assert (REPO / next(opts)).is_file()
        elif arg == "-e":
            spec = next(opts)
            found = re.fullmatch(r"\.(?:\[(?P<extras>[\w,]+)\])?", spec)
            assert found, spec
            for extra in (found["extras"] or "").split(","):
                assert not extra or extra in extras, f"pyproject has no extra {extra!r}"
    return "pip"


def activate(args: list[str]) -> str:
    assert args == [".venv/bin/activate"], args
    return "activate"


def mkdocs(args: list[str]) -> str:
    assert args and args[0] in ("build", "serve"), args
    assert (REPO / "mkdocs.yml").is_file()
    return "mkdocs"


def ruff(args: list[str]) -> str:
    assert args and args[0] in ("check", "format"), args
    for arg in args[1:]:
        if not arg.startswith("-"):
            assert (REPO / arg).exists(), arg
    return "ruff"


# -- the tests --------------------------------------------------------------------------------
def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_command_in_the_docs_is_exercised(path, workdir, monkeypatch):
    page = read_page(path)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name, text in page.files.items():
        (workdir / name).write_text(text)
    for argv in page.commands:
        if tuple(argv) in EXERCISED:  # the same command on another page: once is enough
            continue
        EXERCISED.add(tuple(argv))
        try:
            exercise(list(argv), workdir)
        except Exception as err:  # name the page and the command
            pytest.fail(f"{page.name}: `{shlex.join(argv)}` failed: {err}")


def test_the_harness_refuses_what_it_cannot_exercise(workdir):
    assert simple_commands("a && b \\\n  --c=1 # note\nd; e | f") == [
        ["a"], ["b", "--c=1"], ["d"], ["e"], ["f"]]
    with pytest.raises(AssertionError, match="cannot exercise 'curl'"):
        exercise(["curl", "https://example.org"], workdir)
    with pytest.raises(AssertionError, match="no extra 'gpu'"):
        exercise(["pip", "install", "-e", ".[gpu]"], workdir)
    with _chdir(workdir), pytest.raises(ConfigError, match="no such config file"):
        exercise(["kd-lightning", "fit", "-c", "configs/quickstart/kd.yml"], workdir)


def test_site_builds_strict_offline(tmp_path, monkeypatch):
    """``mkdocs build --strict`` with every non-loopback connection refused; the generated
    pages list every head, every model and every result file with its machine."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    real_connect = socket.socket.connect

    def loopback_only(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network blocked in tests: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    site = tmp_path / "site"
    config = load_config(str(REPO / "mkdocs.yml"), site_dir=str(site), strict=True)
    build(config)
    heads = (site / "reference" / "heads" / "index.html").read_text()
    import kd_lightning.losses as losses
    from kd_lightning.losses import LossHead

    for name in losses.__all__:
        obj = getattr(losses, name)
        if isinstance(obj, type) and issubclass(obj, LossHead) and obj.__name__ in heads:
            continue
        assert not (isinstance(obj, type) and issubclass(obj, LossHead)) or name in (
            "LossHead", "FeatureHead"), f"{name} missing from the head catalogue"
    from kd_lightning.models import list_models

    zoo = (site / "reference" / "models" / "index.html").read_text()
    assert all(f"<code>{name}</code>" in zoo for name in list_models())
    results = (site / "results" / "index.html").read_text()
    for path in (REPO / "docs" / "results").glob("*.*"):
        if path.suffix in (".csv", ".json") and not path.name.endswith(".machine.json"):
            twin = path.with_suffix(".json")  # a CSV with a JSON twin is rendered once, as the JSON
            assert (twin.name if path.suffix == ".csv" and twin.exists() else path.name) in results
    shown = [p for p in (REPO / "docs" / "results").glob("*.*") if p.suffix in (".csv", ".json")
             and not (p.suffix == ".csv" and p.with_suffix(".json").exists())]
    assert results.count("Machine") >= len(shown), results


def test_results_page_renders_each_file_with_its_machine(tmp_path):
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_pages
    finally:
        sys.path.remove(str(REPO / "docs"))
    results = tmp_path / "results"
    results.mkdir()
    (results / "speed.json").write_text(
        '{"machine": {"cpu_model": "AMD EPYC", "nproc": 2}, "rows": [{"mode": "cached", "ratio": 0.31}]}')
    (results / "heads.csv").write_text("head,acc\nkd,0.91\n")
    (results / "heads.machine.json").write_text('"Intel Xeon, 4 cores"')
    (results / "bare.csv").write_text("a\n1\n")
    page = gen_pages.results_page(results)
    speed, heads, bare = (page.split(f"## `{name}`")[1].split("## ")[0]
                          for name in ("speed.json", "heads.csv", "bare.csv"))
    assert "Machine: AMD EPYC, 2 cores, no GPU" in speed and "| cached | 0.31 |" in speed
    assert "Machine: Intel Xeon, 4 cores" in heads and "| kd | 0.91 |" in heads
    assert "not recorded" in bare
    assert "heads.machine.json" not in page


def test_ci_runs_the_readme_install_and_test_commands():
    readme = read_page(REPO / "README.md").commands
    ci = simple_commands((REPO / ".ci" / "run").read_text())
    installs = [c for c in readme if c[0] == "pip"]
    tests = [c for c in readme if c[:3] == ["python", "-m", "pytest"]]
    assert installs and len(tests) == 1
    assert [c for c in ci if c[0] == "pip"] == installs
    assert [c for c in ci if c[:3] == ["python", "-m", "pytest"]] == tests


def test_results_page_reads_csv_headers_provenance_and_flags_changed_configs(tmp_path):
    """A ``# machine:`` comment is provenance, not the table header; accuracies print at one
    decimal; a result whose config changed since it was written is flagged."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_pages
    finally:
        sys.path.remove(str(REPO / "docs"))
    from kd_lightning.provenance import provenance

    results = tmp_path / "results"
    results.mkdir()
    (results / "heads_quickstart.csv").write_text(
        "# machine: AMD EPYC, 2 cores\nconfig,student,test_acc,test_agreement,wall_s\n"
        "configs/kd/kd.yaml,mlp_tiny,0.9190000295639038,0.93,230.1\n"
        "configs/kd/ab.yaml,lenet5,0.9639999866485596,0.97,372.9\n")
    config = REPO / "configs" / "quickstart" / "kd.yaml"
    record = provenance("kd-lightning experiment -c x.yaml", [config])
    record["config_files"] = {"configs/quickstart/kd.yaml": "0" * 64}  # as if edited since
    rows = [{"name": "kd", "kind": "kd", "n_seeds": 2, "test_acc_best_mean": 0.92461,
             "test_acc_best_std": 0.0048, "gain_best": 0.0022}]
    (results / "quick.json").write_text(json.dumps({"meta": record, "rows": rows}))
    page = gen_pages.results_page(results)
    heads = page.split("## `heads_quickstart.csv`")[1].split("## ")[0]
    assert "Machine: AMD EPYC, 2 cores" in heads and "| config | student |" not in heads
    assert "| `configs/kd/kd.yaml` | 91.9 |" in heads and "Student `lenet5`" in heads
    quick = page.split("## `quick.json`")[1]
    assert "92.5 ± 0.5" in quick and "+0.2" in quick
    assert "command: `kd-lightning experiment -c x.yaml`" in quick
    assert "Configs changed since" in quick and "configs/quickstart/kd.yaml" in quick
