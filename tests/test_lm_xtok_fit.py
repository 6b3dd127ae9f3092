"""A cross-tokenizer pair through ``kd-lightning fit``, offline: a tiny teacher is trained
on the movie-review task with a 600-token byte-level BPE, then a student with a 400-token
BPE of the same corpus is distilled from it by ULD (or byte-aligned spans) + CE, the data
tokenizing every row for both (``teacher_vocab_size``); a same-vocabulary head on that pair
is refused in one line, exit 2, and so is the pair when the data gives no teacher
tokenizer."""

from __future__ import annotations

import csv
import math
import sys

import pytest
import torch
import yaml

from kd_lightning.cli import console_main, main
from kd_lightning.errors import ConfigError
from tests.helpers.lm import tiny_llama

TINY = tiny_llama(1)


def _data(root, vocab: int, teacher_vocab: int = 0) -> dict:
    args = {
        "data_dir": str(root / "data"),
        "vocab_size": vocab,
        "plot_chars": 80,
        "max_length": 40,
        "min_completion": 16,
        "batch_size": 8,
        "eval_batch_size": 16,
        "max_train_examples": 96,
        "max_eval_examples": 16,
        "seed": 0,
    }
    if teacher_vocab:
        args["teacher_vocab_size"] = teacher_vocab
    return {"class_path": "kd_lightning.data.lm.MovieReviewsLMDataModule", "init_args": args}


def _trainer(root, name: str, epochs: int) -> dict:
    return {
        "accelerator": "cpu",
        "max_epochs": epochs,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root / "logs"), "name": name, "version": 0},
        },
    }


def _checkpoint(root, name: str) -> dict:
    return {"dirpath": str(root / name), "filename": "best", "enable_version_counter": False}


def _head(name: str, weight: float = 0.5) -> dict:
    return {"class_path": f"kd_lightning.losses.lm.{name}", "init_args": {"weight": weight}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny CausalLMModule teacher trained 2 epochs with the 600-token tokenizer."""
    root = tmp_path_factory.mktemp("xtok")
    config = {
        "seed_everything": 0,
        "test_after_fit": False,
        "model": {
            "class_path": "kd_lightning.modules.lm_distillation.CausalLMModule",
            "init_args": {"model": "llama", "model_kwargs": TINY, "generate_samples": 0},
        },
        "data": _data(root, 600),
        "trainer": _trainer(root, "teacher", 2),
        "checkpoint": _checkpoint(root, "teacher"),
    }
    path = root / "teacher.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "-c", str(path)])
    ckpt = root / "teacher" / "best.ckpt"
    assert ckpt.is_file()
    return root, ckpt


def _student_config(root, ckpt, heads: list[dict], teacher_vocab: int = 600) -> dict:
    return {
        "seed_everything": 0,
        "test_after_fit": True,
        "model": {
            "class_path": "kd_lightning.modules.lm_distillation.LMDistillationModule",
            "init_args": {
                "student": "llama",
                "student_kwargs": TINY,
                "teacher": {"checkpoint": str(ckpt)},
                "heads": heads,
                "chunk_size": 0,
                "generate_samples": 2,
                "max_new_tokens": 4,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
            },
        },
        "data": _data(root, 400, teacher_vocab),
        "trainer": _trainer(root, "student", 2),
        "checkpoint": _checkpoint(root, "student"),
    }


def _epoch_means(root, key: str) -> list[float]:
    with open(root / "logs" / "student" / "version_0" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_uld_student_of_another_tokenizer_trains_through_the_cli(teacher, tmp_path):
    root, ckpt = teacher
    root_s = tmp_path
    (root_s / "data").symlink_to(root / "data")  # the same tokenizers and tokenized cache
    config = _student_config(root_s, ckpt, [_head("ULDLoss"), _head("TokenCrossEntropy")])
    path = root_s / "kd_uld.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "-c", str(path)])
    module, dm = cli.model, cli.datamodule
    assert module.cross_tokenizer and module.teacher_vocab == 600 and module.real_vocab == 400
    assert dm.teacher_tokenizer_digest == module.teacher.kd_tokenizer != dm.tokenizer_digest
    uld, total = _epoch_means(root_s, "train/loss_uld"), _epoch_means(root_s, "train/loss_epoch")
    assert len(uld) == 2 and all(math.isfinite(v) and v > 0 for v in uld), uld
    assert total[1] < total[0], total  # the loss decreases
    assert (root_s / "student" / "best.ckpt").is_file()
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["test/nll"])) and "test/rougeL" in metrics
    # one vocabulary's metrics are not computed for a cross-tokenizer teacher
    assert not any(k in metrics for k in ("test/kl", "test/teacher_nll", "test/teacher_rougeL"))


def test_aligned_span_head_trains_one_step(teacher, tmp_path):
    root, ckpt = teacher
    (tmp_path / "data").symlink_to(root / "data")
    config = _student_config(tmp_path, ckpt, [_head("AlignedSpanLoss", 1.0)])
    config["trainer"].update(max_epochs=None, max_steps=2, limit_val_batches=0, logger=False)
    config["test_after_fit"] = False
    path = tmp_path / "kd_span.yaml"
    path.write_text(yaml.safe_dump(config))
    loss = main(["fit", "-c", str(path)]).trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss > 0


def _refused(path, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["kd-lightning", "fit", "-c", str(path)])
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kd-lightning:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_same_vocabulary_heads_and_missing_teacher_tokenizer_are_refused(
    teacher, tmp_path, monkeypatch, capsys
):
    root, ckpt = teacher
    (tmp_path / "data").symlink_to(root / "data")
    config = _student_config(tmp_path, ckpt, [_head("TokenDivergence"), _head("TokenCrossEntropy")])
    path = tmp_path / "kd_td.yaml"
    path.write_text(yaml.safe_dump(config))
    line = _refused(path, monkeypatch, capsys)
    assert "TokenDivergence" in line and "ULDLoss" in line, line
    config = _student_config(tmp_path, ckpt, [_head("ULDLoss")], teacher_vocab=0)
    path.write_text(yaml.safe_dump(config))
    line = _refused(path, monkeypatch, capsys)
    assert "another tokenizer" in line and "teacher_vocab_size" in line, line
    config = _student_config(tmp_path, ckpt, [_head("ULDLoss")], teacher_vocab=500)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="data.teacher_tokenizer"):  # not the teacher's own
        main(["fit", "-c", str(path)])


def test_the_datas_byte_ends_give_the_tokenizers_aligned_span_loss(teacher):
    """AlignedSpanLoss on a batch (byte ends from the DataModule) equals aligned_span_loss
    computed from the two tokenizers (align.byte_spans of the targets), on random logits."""
    from kd_lightning.data.lm import MovieReviewsLMDataModule
    from kd_lightning.losses.lm import AlignedSpanLoss
    from kd_lightning.losses.lm.align import aligned_span_loss
    from kd_lightning.losses.outputs import TokenOutput

    root, _ = teacher
    dm = MovieReviewsLMDataModule(**_data(root, 400, 600)["init_args"])
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    outs = []
    g = torch.Generator().manual_seed(0)
    for prefix, vocab in (("", 400), ("teacher_", 600)):
        targets = batch[f"{prefix}labels"][:, 1:]
        logits = torch.randn(*targets.shape, vocab, generator=g, dtype=torch.float64)
        outs.append(TokenOutput(logits, targets != -100, targets.clamp_min(0)))
    s, t = outs
    expected, spans = aligned_span_loss(
        s.logits, t.logits, s.targets, t.targets, s.mask, t.mask, dm.tokenizer, dm.teacher_tokenizer
    )
    assert spans > 0
    torch.testing.assert_close(AlignedSpanLoss()(s, t, batch), expected)
