"""Every loss head on the quickstart pair: one full 12-epoch fit per ``configs/kd/*.yaml``.

Trains the quickstart teacher once if ``runs/quickstart/teacher/best.ckpt`` is missing, then
runs ``kd-lightning fit -c configs/quickstart/kd.yaml -c configs/kd/<head>.yaml`` for every
head config, plus the from-scratch baselines of each student the head configs use, and
writes ``docs/results/heads_quickstart.csv`` (config, student, test student accuracy, test
agreement with the teacher, wall seconds), headed by a comment naming the machine.

One seed per config: differences smaller than the seed-to-seed spread of the quickstart
(see the README's quickstart section) are not evidence of a gain.

    python scripts/heads_quickstart.py                  # every configs/kd/*.yaml
    python scripts/heads_quickstart.py --only dist ofd  # a subset (rows are merged in)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kd_lightning.machine import machine_line
from kd_lightning.provenance import file_sha256, git_revision

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart"
HEADS = REPO / "configs" / "kd"
OUT = REPO / "docs" / "results" / "heads_quickstart.csv"
RUNS = REPO / "runs" / "heads_quickstart"
TEACHER = REPO / "runs" / "quickstart" / "teacher" / "best.ckpt"
FIELDS = ["config", "student", "test_acc", "test_agreement", "wall_s", "git_commit", "configs_sha256"]
#: configs/kd files that are whole runs rather than head variants of the quickstart
NOT_HEADS = {"multi_teacher"}


def machine() -> str:
    return (f"# machine: {machine_line()}, {datetime.date.today().isoformat()}; "
            "one seed (0) per row\n# command: python scripts/heads_quickstart.py --only <config stem>\n"
            "# git_commit: per row (the code each row ran on); configs_sha256: of the configs it read")


def configs_sha256(*paths: Path) -> str:
    """One digest of the config files a row read (the docs flag a row whose configs changed)."""
    return "+".join(file_sha256(p)[:16] for p in paths)


def commit() -> str:
    """The commit a row ran on; "-dirty" only for changes outside this script's own output file."""
    rev = git_revision(REPO)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                            capture_output=True, text=True).stdout.splitlines()
    dirty = [line for line in status if not line.endswith(str(OUT.relative_to(REPO)))]
    return rev["git_commit"] + ("-dirty" if dirty else "")


def cli(*args: str) -> float:
    """Run the kd-lightning CLI in a fresh process; return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kd_lightning", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def test_metrics(log_dir: Path) -> dict[str, float]:
    (path,) = log_dir.rglob("metrics.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for key in ("test/acc", "test/agreement"):
        values = [float(r[key]) for r in rows if r.get(key)]
        out[key] = values[-1] if values else float("nan")
    return out


def student_of(config: Path) -> str:
    init = (yaml.safe_load(config.read_text())["model"].get("init_args") or {})
    name = init.get("student", "mlp_tiny")
    width = (init.get("student_kwargs") or {}).get("width")
    return f"{name}(width={width})" if width else name


def run_head(config: Path) -> dict[str, object]:
    name = config.stem
    logs = RUNS / name
    shutil.rmtree(logs, ignore_errors=True)  # a fresh run: one metrics.csv, no old checkpoints
    wall = cli("fit", "-c", str(QUICKSTART / "kd.yaml"), "-c", str(config), "--test_after_fit=true",
               "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
               f"--trainer.logger.save_dir={logs}", "--trainer.logger.name=run",
               f"--checkpoint.dirpath={logs / 'ckpt'}")
    m = test_metrics(logs)
    return {"config": f"configs/kd/{config.name}", "student": student_of(config),
            "test_acc": m["test/acc"], "test_agreement": m["test/agreement"], "wall_s": round(wall, 1),
            "git_commit": commit(), "configs_sha256": configs_sha256(QUICKSTART / "kd.yaml", config)}


def run_scratch(student: str) -> dict[str, object]:
    """The student trained on labels only, with the quickstart's optimizer and epochs."""
    model, _, width = student.partition("(width=")
    logs = RUNS / f"scratch_{model}{width.rstrip(')')}"
    args = ["fit", "-c", str(QUICKSTART / "scratch.yaml"), f"--model.init_args.model={model}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={logs}", "--trainer.logger.name=run",
            f"--checkpoint.dirpath={logs / 'ckpt'}", "--test_after_fit=true"]
    if width:
        args.append(f"--model.init_args.model_kwargs={{width: {width.rstrip(')')}}}")
    wall = cli(*args)
    m = test_metrics(logs)
    return {"config": "configs/quickstart/scratch.yaml", "student": student,
            "test_acc": m["test/acc"], "test_agreement": "", "wall_s": round(wall, 1),
            "git_commit": commit(), "configs_sha256": configs_sha256(QUICKSTART / "scratch.yaml")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="config stems to run (default: all)")
    parser.add_argument("--no-scratch", action="store_true", help="skip the scratch baselines")
    args = parser.parse_args()
    if not TEACHER.exists():
        cli("fit", "-c", str(QUICKSTART / "teacher.yaml"))
    configs = sorted(p for p in HEADS.glob("*.yaml") if p.stem not in NOT_HEADS)
    if args.only:
        configs = [p for p in configs if p.stem in args.only]
    rows: dict[tuple[str, str], dict[str, object]] = {}
    if OUT.exists():  # keep earlier rows (a partial run merges in)
        with open(OUT) as fh:
            for row in csv.DictReader(line for line in fh if not line.startswith("#")):
                rows[(row["config"], row["student"])] = row
    students = set()
    for config in configs:
        row = run_head(config)
        students.add(str(row["student"]))
        rows[(str(row["config"]), str(row["student"]))] = row
        write(rows)  # after every run: an interrupted sweep keeps what it measured
    if not args.no_scratch:
        for student in sorted(students):
            row = run_scratch(student)
            rows[(str(row["config"]), student)] = row
            write(rows)


def write(rows: dict[tuple[str, str], dict[str, object]]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", newline="") as fh:
        fh.write(machine() + "\n")
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for key in sorted(rows):
            writer.writerow({k: rows[key].get(k, "") for k in FIELDS})
    print(f"wrote {OUT} ({len(rows)} rows)", flush=True)


if __name__ == "__main__":
    main()
