"""The reproduction configs (configs/repro/) follow the recipe table, and run.

``configs/repro/recipes.yaml`` holds the published recipes field by field, each value
citing the reference repository's file and line. Every config under configs/repro/ must be
listed there (the CIFAR pairs' runs, or a ``method_configs`` entry citing repo@commit and
file), with no allow-list, and every field of every listed config must match its row: a config
that drifts from the published recipe fails here. Representative pairs also run
teacher → scratch → KD → DKD → CRD for two batches on generated files in the real CIFAR
formats, on all training images (``val_fraction: 0``), with the configs' own run
directories, and the *instantiated* optimizer, schedule and heads are checked too.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from kd_lightning.cli import main
from kd_lightning.modules.teacher import fingerprint
from tests.conftest import CONFIGS, DEBUG_TRAINER

REPRO = CONFIGS / "repro"
TABLE: dict[str, Any] = yaml.safe_load((REPRO / "recipes.yaml").read_text())

DATA_CLASS = {
    "cifar100": "kd_lightning.data.CIFAR100DataModule",
    "cifar10": "kd_lightning.data.CIFAR10DataModule",
}
#: (pair, run) of every config the table lists
LISTED = [
    (pair, run) for pair, info in TABLE["pairs"].items() for run in TABLE["runs"][info["runs"]]
]
#: pairs that run their whole chain (the rest: field check + a parse of a few)
RUN_PAIRS = ("cifar100/resnet32x4_ShuffleV2", "cifar10/resnet110_resnet20")
#: configs parsed by the CLI (--print_config): every run kind, every dataset and protocol,
#: and each model family once
PARSED = [("cifar100/resnet56_resnet20", r) for r in ("teacher", "scratch", "kd", "dkd", "crd")] + [
    ("cifar100/ResNet50_MobileNetV2", "crd"),
    ("cifar100/wrn_40_2_wrn_16_2", "dkd"),
    ("cifar100/vgg13_vgg8", "crd"),
    ("cifar100/wrn_40_2_ShuffleV1", "kd"),
    ("cifar10/resnet56_resnet20", "kd"),
]


def expected(pair: str, run: str) -> dict[str, Any]:
    """Every field the config of (pair, run) must have, from the table alone."""
    info = TABLE["pairs"][pair]
    spec = TABLE["runs"][info["runs"]][run]
    proto = {k: v["value"] for k, v in TABLE["protocols"][spec["protocol"]].items()}
    network = info["teacher"] if run == "teacher" else info["student"]
    small = TABLE["protocols"][spec["protocol"]].get("lr_small_networks", {}).get("networks", [])
    out = dict(
        proto,
        network=network,
        lr=proto["lr_small_networks"] if network in small else proto["lr"],
        published=info["published"].get(run),
        heads=None,
    )
    if "method" in spec:
        heads = {cls: dict(args) for cls, args in TABLE["methods"][spec["method"]]["heads"].items()}
        if "DKD" in heads:
            heads["DKD"]["beta"] = info["dkd_beta"]["value"]
        out["heads"] = heads
    return out


#: every other config (per-method CIFAR configs, ImageNet): its entry in ``method_configs``
METHOD_CONFIGS: dict[str, Any] = TABLE["method_configs"]


def test_every_config_is_in_the_recipe_table():
    """No allow-list: every YAML under configs/repro/ is a (pair, run) or a method_configs entry."""
    found = {(str(p.parent.relative_to(REPRO)), p.stem) for p in REPRO.glob("*/**/*.yaml")}
    table = set(LISTED) | {tuple(k.rsplit("/", 1)) for k in METHOD_CONFIGS}
    unlisted = sorted(f"{pair}/{run}.yaml" for pair, run in found - table)
    assert not unlisted, f"add these to configs/repro/recipes.yaml: {unlisted}"
    missing = sorted(f"{pair}/{run}.yaml" for pair, run in table - found)
    assert not missing, f"the recipe table lists configs that do not exist: {missing}"


def test_table_cites_a_source_for_every_value():
    for name, proto in TABLE["protocols"].items():
        for field, entry in proto.items():
            assert re.search(r"\.(py|yaml|md|pth|sh)\b", entry["source"]), (name, field)
    for name, method in TABLE["methods"].items():
        assert re.search(r"L\d+", method["source"]), name
    for pair, info in TABLE["pairs"].items():
        if "dkd_beta" in info:
            assert (
                "mdistiller" in info["dkd_beta"]["source"] or "cfg.py" in info["dkd_beta"]["source"]
            ), pair


def _heads_of(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    heads = {}
    for h in model.get("heads", []):
        args = dict(h.get("init_args", {}))
        schedule = args.pop("schedule", None)
        if schedule is not None:  # the DKD warm-up
            assert schedule["class_path"] == "kd_lightning.losses.LinearWarmup"
            args["warmup_epochs"] = schedule["init_args"]["epochs"]
        heads[h["class_path"].rsplit(".", 1)[-1]] = args
    return heads


@pytest.mark.parametrize("pair_run", LISTED, ids=[f"{p}/{r}" for p, r in LISTED])
def test_config_matches_the_recipe_table(pair_run: tuple[str, str]):
    pair, run = pair_run
    want = expected(pair, run)
    path = REPRO / pair / f"{run}.yaml"
    text = path.read_text()
    raw = yaml.safe_load(text)
    model, data, trainer = raw["model"]["init_args"], raw["data"]["init_args"], raw["trainer"]
    assert raw["data"]["class_path"] == DATA_CLASS[pair.split("/")[0]]
    assert model.get("student", model.get("model")) == want["network"]
    opt = model["optimizer"]
    assert opt["class_path"] == "torch.optim.SGD"
    assert opt["init_args"]["lr"] == want["lr"]
    assert opt["init_args"]["momentum"] == want["momentum"]
    assert opt["init_args"]["weight_decay"] == pytest.approx(want["weight_decay"])
    assert opt["init_args"].get("nesterov", False) is want["nesterov"]
    sched = model["lr_scheduler"]
    assert sched["class_path"] == "torch.optim.lr_scheduler.MultiStepLR"
    assert sched["init_args"] == {"milestones": want["milestones"], "gamma": want["gamma"]}
    assert trainer["max_epochs"] == want["epochs"] and trainer["accelerator"] == "gpu"
    assert data["batch_size"] == want["batch_size"]
    # the protocol: all training images, the reference's constants and padding
    assert data["val_fraction"] == want["val_fraction"] == 0.0
    assert data["mean"] == want["mean"] and data["std"] == want["std"]
    assert data.get("crop_padding_mode", "constant") == want["crop_padding_mode"]
    # every run reports the three labelled numbers and names the one its source published
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in trainer.get("callbacks", [])}
    assert callbacks["kd_lightning.callbacks.TestEveryEpoch"]["source_reports"] == want["reports"]
    assert raw["checkpoint"]["dirpath"] == f"runs/repro/{pair}/{run}"
    if want["heads"] is None:
        assert raw["model"]["class_path"] == "kd_lightning.modules.ClassifierModule"
    else:
        assert _heads_of(model) == want["heads"]
        assert model["teacher"]["checkpoint"] == (
            f"runs/repro/{pair}/teacher/{want['teacher_checkpoint']}.ckpt"
        )
    # the number it targets, cited in its header
    header = "".join(line for line in text.splitlines() if line.startswith("#"))
    if want["published"] is None:
        assert "Published: none" in header
    else:
        assert f"Published: {want['published']:.2f}" in header


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_method_config_matches_its_table_entry(name: str):
    want = METHOD_CONFIGS[name]
    assert re.search(r"[\w.-]+/[\w.-]+(@[0-9a-f]{7,40})? \S+\.(py|yaml|md|sh)", want["source"]), (
        name
    )
    raw = yaml.safe_load((REPRO / f"{name}.yaml").read_text())
    model, trainer, data = raw["model"]["init_args"], raw["trainer"], raw["data"]["init_args"]
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in trainer.get("callbacks", [])}
    got = {
        "source": want["source"],
        "student": model["student"],
        "epochs": trainer["max_epochs"],
        "batch_size": data["batch_size"],
        "devices": trainer["devices"],
        "optimizer": {
            "class_path": model["optimizer"]["class_path"],
            **model["optimizer"]["init_args"],
        },
        "milestones": model["lr_scheduler"]["init_args"]["milestones"],
        "reports": callbacks.get("kd_lightning.callbacks.TestEveryEpoch", {}).get("source_reports"),
        "strong_view": data.get("strong_view", False),
        "heads": {
            h["class_path"].rsplit(".", 1)[-1]: h.get("init_args", {}) for h in model["heads"]
        },
    }
    assert got == want


@pytest.mark.parametrize("pair_run", PARSED, ids=[f"{p}/{r}" for p, r in PARSED])
def test_print_config(pair_run: tuple[str, str]):
    pair, run = pair_run
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(REPRO / pair / f"{run}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["data"]["init_args"]["val_fraction"] == 0.0
    model = printed["model"]["init_args"]
    assert model.get("student", model.get("model")) == expected(pair, run)["network"]


def _check_instantiated(cli, pair: str, run: str) -> None:
    want = expected(pair, run)
    sgd = cli.trainer.optimizers[0]
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["momentum"]) == (want["lr"], want["momentum"])
    assert sgd.defaults["nesterov"] is want["nesterov"]
    assert sgd.defaults["weight_decay"] == pytest.approx(want["weight_decay"])
    schedule = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(schedule, torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(schedule.milestones) == want["milestones"] and schedule.gamma == want["gamma"]
    dm = cli.datamodule
    assert (tuple(dm.mean), tuple(dm.std)) == (tuple(want["mean"]), tuple(want["std"]))
    crop = dm.augmentations()[0]
    assert crop.padding == 4 and crop.padding_mode == want["crop_padding_mode"]
    if want["heads"] is not None:
        heads = {type(h).__name__: h for h in cli.model.heads}
        assert set(heads) == set(want["heads"])
        for cls, args in want["heads"].items():
            for key, value in args.items():
                attr = {
                    "warmup_epochs": None,
                    "student_layers": None,
                    "teacher_layers": None,
                    "num_samples": None,
                }.get(key, key)
                if attr is not None and hasattr(heads[cls], attr):
                    assert getattr(heads[cls], attr) == pytest.approx(value), (cls, key)


@pytest.mark.parametrize("pair", RUN_PAIRS)
def test_pair_runs_every_config_on_all_training_images(pair: str, request, tmp_path: Path):
    dataset = pair.split("/")[0]
    root = request.getfixturevalue(f"{dataset}_root")
    runs = [r for p, r in LISTED if p == pair]
    overrides = [
        *DEBUG_TRAINER,
        "--trainer.precision=32-true",
        "--trainer.benchmark=false",
        "--test_after_fit=false",
        f"--data.init_args.data_dir={root}",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false",
    ]  # no val_fraction override: the configs' own 0, every training image
    out = tmp_path / "runs" / "repro" / pair  # the configs' relative run dirs land here
    n_train = {"cifar100": 400, "cifar10": 300}[dataset]  # tests/helpers/fake_data.py
    for run in runs:
        cli = main(["fit", "-c", str(REPRO / pair / f"{run}.yaml"), *overrides])
        assert len(cli.datamodule.train_set) == n_train and cli.datamodule.val_set is None
        assert not any(k.startswith("val/") for k in cli.trainer.callback_metrics)
        _check_instantiated(cli, pair, run)
        assert (out / run / "last.ckpt").is_file()
        result = json.loads(next((out / run).glob("version_*/results.json")).read_text())
        acc = result["accuracy"]
        assert acc["last"]["value"] is not None and acc["best_on_test"]["value"] is not None
        assert acc["best_by_val"]["value"] is None  # no validation split
        assert "optimistic" in acc["best_on_test"]["label"]
        assert result["source_reports"] == expected(pair, run)["reports"]
        assert result["protocol"]["train_images"] == n_train
    # the distilled-from teacher carries exactly the weights the teacher run saved last
    saved = torch.load(out / "teacher" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    # (the teacher's BatchNorms are folded at build time; its fingerprint is taken before that)
    ours = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert cli.model.teacher_fingerprints[0] == fingerprint(SimpleNamespace(state_dict=lambda: ours))


def test_every_pair_has_an_experiment_spec_that_parses():
    from kd_lightning.experiment.spec import parse_spec

    for pair, info in TABLE["pairs"].items():
        spec = parse_spec(["-c", str(CONFIGS / "experiments" / "repro" / f"{pair}.yaml")])
        runs = list(TABLE["runs"][info["runs"]])
        assert sorted(s.name for _, s in spec.stages()) == sorted(runs) and spec.seeds == [0, 1, 2]
        for _, stage in spec.stages():
            assert stage.configs == [f"configs/repro/{pair}/{stage.name}.yaml"]
            assert spec.published == {run: info["published"].get(run) for run in runs}
        assert spec.published_source


# -- ImageNet: ReviewKD and DIST follow their authors' recipes (issue 20) --------------------
IMAGENET = REPRO / "imagenet"
#: pair → (ReviewKD weight, student taps, teacher taps): mdistiller@a08d46f
#: configs/imagenet/{r34_r18,r50_mv1}/reviewkd.yaml (STU_PREACT: pre-ReLU stages of both)
REVIEWKD_IMAGENET = {
    "resnet34_resnet18": (
        1.0,
        [
            "layer1.1.relu:input",
            "layer2.1.relu:input",
            "layer3.1.relu:input",
            "layer4.1.relu:input",
            "fc.embedding",
        ],
        [
            "layer1.2.relu:input",
            "layer2.3.relu:input",
            "layer3.5.relu:input",
            "layer4.2.relu:input",
            "fc.embedding",
        ],
    ),
    "resnet50_mobilenetv1": (
        8.0,
        ["layer1.2.5:input", "layer2.1.5:input", "layer3.5.5:input", "layer4.1.5:input", "pool"],
        [
            "layer1.2.relu:input",
            "layer2.3.relu:input",
            "layer3.5.relu:input",
            "layer4.2.relu:input",
            "fc.embedding",
        ],
    ),
}
#: published targets: ReviewKD@cede6ea ImageNet/README.md L26-L29, DIST_KD@2418f18 README.md L46-L47
IMAGENET_TARGETS = {
    ("resnet34_resnet18", "reviewkd"): 71.61,
    ("resnet50_mobilenetv1", "reviewkd"): 72.56,
    ("resnet34_resnet18", "dist"): 72.07,
    ("resnet50_mobilenetv1", "dist"): 73.24,
}


def _global_batch(raw: dict[str, Any]) -> int:
    trainer = raw["trainer"]
    return raw["data"]["init_args"]["batch_size"] * trainer["devices"] * trainer.get("num_nodes", 1)


@pytest.mark.parametrize("pair", sorted(REVIEWKD_IMAGENET))
def test_imagenet_reviewkd_follows_mdistiller(pair: str):
    raw = yaml.safe_load((IMAGENET / pair / "reviewkd.yaml").read_text())
    weight, student, teacher = REVIEWKD_IMAGENET[pair]
    heads = {
        h["class_path"].rsplit(".", 1)[-1]: h["init_args"]
        for h in raw["model"]["init_args"]["heads"]
    }
    assert heads["ReviewKD"]["weight"] == weight
    assert (
        heads["ReviewKD"]["student_layers"] == student
        and heads["ReviewKD"]["teacher_layers"] == teacher
    )
    assert heads["ReviewKD"]["schedule"]["init_args"] == {"epochs": 1}
    opt = raw["model"]["init_args"]["optimizer"]
    assert opt["class_path"] == "torch.optim.SGD" and opt["init_args"]["lr"] == 0.1
    assert _global_batch(raw) == 256


@pytest.mark.parametrize("pair", sorted(REVIEWKD_IMAGENET))
def test_imagenet_dist_follows_dist_kd(pair: str):
    raw = yaml.safe_load((IMAGENET / pair / "dist.yaml").read_text())
    heads = {
        h["class_path"].rsplit(".", 1)[-1]: h["init_args"]
        for h in raw["model"]["init_args"]["heads"]
    }
    # ori_loss_weight 1, kd_loss_weight 2 · DIST(beta 1, gamma 1, tau 1): CE 1, inter 2, intra 2
    assert heads["CrossEntropy"]["weight"] == 1.0
    assert heads["DIST"] == {"weight": 2.0, "beta": 1.0, "gamma": 1.0, "temperature": 1.0}
    opt = raw["model"]["init_args"]["optimizer"]
    assert opt["class_path"] == "kd_lightning.optim.SGD"
    assert opt["init_args"] == {
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1.0e-4,
        "no_decay_1d": True,
    }
    assert _global_batch(raw) == 256


@pytest.mark.parametrize("pair_run", sorted(IMAGENET_TARGETS))
def test_imagenet_targets_cite_the_authors(pair_run: tuple[str, str]):
    text = (IMAGENET / pair_run[0] / f"{pair_run[1]}.yaml").read_text()
    assert f"Target: {IMAGENET_TARGETS[pair_run]:.2f} top-1" in text


def test_no_config_cites_a_machine_path():
    for path in REPRO.rglob("*.yaml"):
        text = path.read_text()
        assert "/work/" not in text and "reference-results" not in text, path


def test_sgd_no_decay_1d_matches_dist_kd_param_groups():
    """kd_lightning.optim.SGD(no_decay_1d) = image_classification_sota@d9662f7 lib/utils/optim.py
    L41-L63: 1-d parameters (biases, BN) undecayed; one Nesterov step checked by hand."""
    from kd_lightning.optim import SGD

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(2),
    ).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    net(x)
    before = [p.detach().clone() for p in net.parameters()]
    opt = SGD(
        net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.5, no_decay_1d=True
    )
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.5]
    net(x).square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step()
    for p, p0, g in zip(net.parameters(), before, grads):
        d = g + (0.5 * p0 if p0.ndim > 1 else 0.0)  # first step: buf = d; nesterov: d + 0.9·buf
        torch.testing.assert_close(p.detach(), p0 - 0.1 * (d + 0.9 * d), rtol=1e-12, atol=1e-12)


def test_cifar_strong_view_doubles_the_batch_for_mlkd(cifar100_root):
    """data.strong_view: each batch of B images holds 2·B rows, the strong views flagged for
    the MLKD head (reference: get_dataset_strong, RandAugment(2, 10) + Cutout)."""
    from kd_lightning.data import CIFAR100DataModule
    from kd_lightning.errors import ConfigError
    from kd_lightning.losses import MLKD
    from kd_lightning.losses.outputs import ModelOutput

    dm = CIFAR100DataModule(
        data_dir=str(cifar100_root), val_fraction=0.0, batch_size=4, strong_view=True
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32)
    assert batch["strong_view"].tolist() == [False] * 4 + [True] * 4
    assert torch.equal(batch["label"][:4], batch["label"][4:])
    assert torch.equal(batch["index"][:4], batch["index"][4:])
    assert not torch.equal(batch["image"][:4], batch["image"][4:])
    assert len(dm.test_set[0]) == 4 and "strong_image" not in dm.test_set[0]  # eval: one view
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 8, 100, dtype=torch.float64, generator=g)
    loss = MLKD(weight=0.9)(ModelOutput(z_s), ModelOutput(z_t), batch)
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(ConfigError, match="data.strong_view"):
        CIFAR100DataModule(data_dir=str(cifar100_root), strong_view=True, augment_on_device=True)
