"""Compute cost of the reproduction experiments, from counted FLOPs (no GPU needed).

``python -m kd_lightning.experiment.cost [-o docs/results/repro_gpu_hours.csv]`` counts
the forward FLOPs of every network of ``configs/repro/recipes.yaml`` on one 32×32 image
(``torch.utils.flop_counter``: a multiply-add counts 2), and per run of each pair:

    train = epochs × train_images × (3 × student forward [forward + backward ≈ 3×]
                                     + teacher forward [KD/DKD/CRD: frozen, forward only]
                                     + CRD's contrast: 2 memory banks × (nce_k + 1) × feat_dim × 2)
    test  = epochs × 10,000 × student forward      (TestEveryEpoch, every epoch)

GPU hours are those FLOPs at an *assumed* effective throughput (``--tflops``, default 20:
TF32 on an A100/H100-class GPU reaches far less than its peak on batch-64 CIFAR networks).
It is an estimate, not a measurement: small networks (resnet20, resnet8x4) are bound by
per-step latency rather than FLOPs, so their real time is longer than this lower bound.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from kd_lightning.models import create_model

REPO = Path(__file__).resolve().parents[2]
TEST_IMAGES = 10_000


def forward_flops(name: str, num_classes: int) -> int:
    """FLOPs of one forward pass of one 3×32×32 image (eval mode)."""
    model = create_model(name, num_classes=num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return int(counter.get_total_flops())


def estimate(table: dict, tflops: float, seeds: int = 3) -> list[dict]:
    """One row per (pair, run): FLOPs and GPU hours of all its seeds (the teacher: one run)."""
    cache: dict[tuple[str, int], int] = {}

    def fwd(name: str, classes: int) -> int:
        if (name, classes) not in cache:
            cache[(name, classes)] = forward_flops(name, classes)
        return cache[(name, classes)]

    rows = []
    for pair, info in table["pairs"].items():
        classes = 100 if pair.startswith("cifar100/") else 10
        for run, spec in table["runs"][info["runs"]].items():
            proto = {k: v["value"] for k, v in table["protocols"][spec["protocol"]].items()}
            net = info["teacher"] if run == "teacher" else info["student"]
            per_image = 3 * fwd(net, classes)
            if "method" in spec:
                per_image += fwd(info["teacher"], classes)
                crd = table["methods"][spec["method"]]["heads"].get("CRD")
                if crd:
                    per_image += 2 * (crd["nce_k"] + 1) * crd["feat_dim"] * 2
            epochs, n_train = proto["epochs"], proto["train_images"]
            one_run = epochs * (n_train * per_image + TEST_IMAGES * fwd(net, classes))
            n_runs = 1 if run == "teacher" else seeds
            total = one_run * n_runs
            rows.append({
                "pair": pair, "run": run, "network": net, "teacher": info["teacher"],
                "epochs": epochs, "runs": n_runs,
                "student_fwd_mflop": round(fwd(net, classes) / 1e6, 2),
                "teacher_fwd_mflop": round(fwd(info["teacher"], classes) / 1e6, 2),
                "pflop_per_run": round(one_run / 1e15, 3), "pflop_total": round(total / 1e15, 3),
                "assumed_effective_tflops": tflops,
                "gpu_hours_total_estimate": round(total / (tflops * 1e12) / 3600, 2),
            })
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m kd_lightning.experiment.cost")
    parser.add_argument("-o", "--output", default=str(REPO / "docs/results/repro_gpu_hours.csv"))
    parser.add_argument("--tflops", type=float, default=20.0,
                        help="assumed effective TFLOP/s of the GPU on these networks")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    table = yaml.safe_load((REPO / "configs/repro/recipes.yaml").read_text())
    rows = estimate(table, args.tflops, args.seeds)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from kd_lightning.provenance import provenance

    record = provenance(["python", "-m", "kd_lightning.experiment.cost", *(argv or [])],
                        [REPO / "configs/repro/recipes.yaml"], vars(args))
    with out.open("w", newline="") as fh:
        fh.write(f"# estimate from counted FLOPs at an assumed {args.tflops} TFLOP/s effective; "
                 "not a measurement\n")
        fh.write(f"# command: {record['command']}\n# git_commit: {record['git_commit']}"
                 f"{'-dirty' if record.get('git_dirty') else ''}\n")
        fh.write(f"# resolved_config_sha256: {record['resolved_config_sha256']}\n")
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        pairs: dict[str, float] = {}
        for r in rows:
            pairs[r["pair"]] = pairs.get(r["pair"], 0.0) + r["gpu_hours_total_estimate"]
        for pair, hours in pairs.items():  # per-pair totals, same columns
            writer.writerow({"pair": pair, "run": "ALL", "gpu_hours_total_estimate": round(hours, 2),
                             "assumed_effective_tflops": args.tflops})
        writer.writerow({"pair": "ALL", "run": "ALL", "assumed_effective_tflops": args.tflops,
                         "gpu_hours_total_estimate": round(sum(pairs.values()), 2)})
    print(f"wrote {out}: {sum(pairs.values()):.1f} GPU hours in all at {args.tflops} TFLOP/s "
          "effective (an estimate from counted FLOPs)")
    return out


if __name__ == "__main__":
    main()
