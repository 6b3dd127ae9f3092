"""The text path through the CLI: the quickstart configs end to end on the offline corpus,
and a BERT → BERT run with transformer feature heads."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.cli import main
from tests.conftest import CONFIGS, DEBUG_TRAINER, logger_args

QUICKSTART = CONFIGS / "text" / "quickstart"
#: keeps the runs small: the real corpus, a short max_length, a small vocabulary
SMALL_DATA = ["--data.max_length=24", "--data.vocab_size=500", "--data.batch_size=16",
              "--data.eval_batch_size=64"]


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_teacher")
    main([
        "fit", "-c", str(QUICKSTART / "teacher.yaml"), *DEBUG_TRAINER, *SMALL_DATA,
        "--model.model_kwargs={layers: 2, hidden: 32, heads: 2}",
        f"--data.data_dir={out / 'data'}", f"--checkpoint.dirpath={out / 'teacher'}",
        *logger_args(out / "logs"),
    ])
    ckpt = out / "teacher" / "best.ckpt"
    assert ckpt.exists()
    return ckpt


def test_quickstart_teacher_then_kd(text_teacher, tmp_path):
    data_dir = text_teacher.parent.parent / "data"
    main([
        "fit", "-c", str(QUICKSTART / "kd.yaml"), *DEBUG_TRAINER, *SMALL_DATA,
        f"--data.data_dir={data_dir}", f"--model.teacher.checkpoint={text_teacher}",
        f"--checkpoint.dirpath={tmp_path / 'kd'}", *logger_args(tmp_path / "logs", "kd"),
    ])
    ckpt = torch.load(tmp_path / "kd" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["student"] == "bag_of_embeddings"
    assert ckpt["hyper_parameters"]["vocab_sizes"] == {"input_ids": 500}
    metrics = (tmp_path / "logs").rglob("metrics.csv")
    header = next(metrics).read_text().splitlines()[0]
    assert "test/acc" in header and "test/teacher_acc" in header


def test_text_kd_with_transformer_feature_heads(text_teacher, tmp_path):
    """A 1-layer BERT student of the 2-layer teacher, initialised from every other layer,
    trained with soft CE + hidden-state cosine + attention MSE (DistilBERT/TinyBERT)."""
    data_dir = text_teacher.parent.parent / "data"
    heads = (
        "[{class_path: kd_lightning.losses.KLDivergence, init_args: {weight: 1.0}},"
        " {class_path: kd_lightning.losses.HiddenStateCosine,"
        "  init_args: {weight: 1.0, layer_map: [[0, 1]]}},"
        " {class_path: kd_lightning.losses.AttentionMSE,"
        "  init_args: {weight: 1.0, layer_map: [[0, 1]]}}]"
    )
    main([
        "fit", "-c", str(QUICKSTART / "kd.yaml"), *DEBUG_TRAINER, *SMALL_DATA,
        "--model.student=bert", "--model.student_kwargs={layers: 1, hidden: 32, heads: 2}",
        "--model.init_from_teacher=every_kth", f"--model.heads={heads}",
        "--model.performance={teacher_cache: \"off\"}",
        f"--data.data_dir={data_dir}", f"--model.teacher.checkpoint={text_teacher}",
        f"--checkpoint.dirpath={tmp_path / 'kd'}", *logger_args(tmp_path / "logs", "kd"),
    ])
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    header = metrics.splitlines()[0]
    assert "train/loss_hidden_cos" in header and "train/loss_attention_mse" in header
    state = torch.load(tmp_path / "kd" / "best.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("student.model.bert.encoder.layer.0.") for k in state["state_dict"])


@pytest.mark.parametrize("recipe", ["teacher", "bilstm_tang", "distilbert"])
def test_sst2_recipes_parse(recipe, capsys):
    """The online SST-2 recipes cannot run offline; their configs must still parse."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", str(CONFIGS / "text" / "sst2" / f"{recipe}.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "tokenizer: bert-base-uncased" in printed and "subset: sst2" in printed
    if recipe == "distilbert":
        assert "init_from_teacher: every_kth" in printed and "HiddenStateCosine" in printed
    if recipe == "bilstm_tang":
        assert "student: bilstm" in printed and "LogitMSE" in printed
        assert "TextAugmentTransfer" in printed


def test_quickstart_student_has_at_most_a_fifth_of_the_teachers_parameters():
    import yaml

    from kd_lightning.models import model_from_config

    teacher_cfg = yaml.safe_load((QUICKSTART / "teacher.yaml").read_text())
    kd_cfg = yaml.safe_load((QUICKSTART / "kd.yaml").read_text())
    data = kd_cfg["data"]["init_args"]
    same = ("vocab_size", "max_length", "seed")  # one tokenizer, split and length for both
    assert {k: data[k] for k in same} == {k: teacher_cfg["data"]["init_args"][k] for k in same}
    inputs = {"vocab_size": data["vocab_size"], "max_length": data["max_length"]}
    t_args, s_args = teacher_cfg["model"]["init_args"], kd_cfg["model"]["init_args"]
    teacher = model_from_config(t_args["model"], 2, inputs, "model.model", t_args["model_kwargs"])
    student = model_from_config(s_args["student"], 2, inputs, "model.student",
                                s_args["student_kwargs"])
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student <= n_teacher / 5, (n_student, n_teacher)


def test_kd_refuses_data_whose_tokenizer_differs_from_the_teachers(text_teacher, tmp_path):
    """A WordPiece retrained with other settings keeps its size but not its ids: the teacher
    checkpoint's vocabulary digest catches it before any step."""
    from kd_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="another vocabulary") as err:
        main([
            "fit", "-c", str(QUICKSTART / "kd.yaml"), *DEBUG_TRAINER, *SMALL_DATA,
            f"--data.data_dir={tmp_path / 'data'}", "--data.lowercase=false",
            f"--model.teacher.checkpoint={text_teacher}",
            f"--checkpoint.dirpath={tmp_path / 'kd'}", *logger_args(tmp_path / "logs", "kd"),
        ])
    assert err.value.field == "data.tokenizer"
    assert not list((tmp_path / "kd").glob("*.ckpt"))  # nothing trained, nothing saved
