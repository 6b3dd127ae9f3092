"""The top-k token store in a fit: ``kd-lightning data store-teacher`` on an LM config, then
``LMDistillationModule(token_store=...)`` trains from it offline; at k = V (fp32) the first
step's loss is the live teacher's; what a store cannot serve is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from kd_lightning.cli import main
from kd_lightning.errors import ConfigError
from kd_lightning.modules.lm_distillation import LMDistillationModule, OnPolicySpec
from kd_lightning.modules.teacher import TeacherSpec
from tests.helpers.lm import tiny_llama

TINY = tiny_llama(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny jsonl splits, a 300-token byte-level BPE, a tiny teacher folder, a fit config."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from kd_lightning.data.lm import EOS, PAD
    from kd_lightning.models.lm import build_causal_lm

    root = tmp_path_factory.mktemp("lm_store_fit")
    words = "the film plot review critic story actor scene great dull funny slow".split()
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt": "Review: " + " ".join(rng.choice(words, 6)),
            "completion": " " + " ".join(rng.choice(words, int(rng.integers(3, 9)))),
        }
        for _ in range(24)
    ]
    files = {}
    for split, part in (("train", rows[:16]), ("val", rows[16:20]), ("test", rows[20:])):
        files[split] = str(root / f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [r["prompt"] + r["completion"] for r in rows],
        vocab_size=300,
        min_frequency=1,
        special_tokens=[EOS, PAD],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=PAD)
    folder = root / "teacher"
    torch.manual_seed(0)
    build_causal_lm("llama", len(tok), TINY).save_pretrained(folder)
    tok.save_pretrained(folder)  # the teacher's own tokenizer: the data uses it too
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "kd_lightning.modules.lm_distillation.LMDistillationModule",
            "init_args": {
                "student": "llama",
                "student_kwargs": TINY,
                "teacher": {"model": f"hf:{folder}"},
                "heads": [
                    {
                        "class_path": "kd_lightning.losses.lm.TokenDivergence",
                        "init_args": {"weight": 0.5, "divergence": "jsd", "beta": 0.5},
                    },
                    {
                        "class_path": "kd_lightning.losses.lm.TokenCrossEntropy",
                        "init_args": {"weight": 0.5},
                    },
                ],
                "chunk_size": 0,
                "generate_samples": 0,
            },
        },
        "data": {
            "class_path": "kd_lightning.data.lm.PromptCompletionDataModule",
            "init_args": {
                "data_files": files,
                "tokenizer": str(folder),
                "data_dir": str(root / "cache"),
                "max_length": 32,
                "min_completion": 8,
                "batch_size": 4,
                "eval_batch_size": 4,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root / "runs"),
        },
    }
    path = root / "kd.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path, folder, len(tok)


def _fit(path, *extra):
    cli = main(["fit", "-c", str(path), *extra])
    return cli.trainer.callback_metrics


def test_store_then_fit_offline_and_refusals(setup, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, path, _, _ = setup
    store = root / "store_k8"
    written = main(["data", "store-teacher", "-c", str(path), "--output", str(store), "--k", "8"])
    assert written.k == 8 and set(written.stages) == {"train", "val"}
    with pytest.raises(ConfigError, match="--overwrite"):  # the earlier store is kept
        main(["data", "store-teacher", "-c", str(path), "--output", str(store)])
    metrics = _fit(
        path,
        f"--model.init_args.token_store={store}",
        "--model.init_args.token_store_tail=bucket",
        "--trainer.max_steps=4",  # one epoch: the validation runs
        "--trainer.limit_val_batches=1",
    )
    for key in ("train/loss", "val/nll", "val/kl", "val/teacher_nll"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["val/kl"] >= 0
    with pytest.raises(ConfigError, match="model.chunk_size"):
        _fit(path, f"--model.init_args.token_store={store}", "--model.init_args.chunk_size=16")
    # another teacher (another seed's weights): refused by the store's fingerprint, one line
    other = root / "other_teacher"
    from kd_lightning.models.lm import build_causal_lm

    torch.manual_seed(1)
    build_causal_lm("llama", setup[3], TINY).save_pretrained(other)
    with pytest.raises(ConfigError, match="another teacher") as err:
        _fit(
            path,
            f"--model.init_args.token_store={store}",
            f"--model.init_args.teacher={json.dumps({'model': f'hf:{other}'})}",
        )
    assert "model.token_store" in str(err.value) and "\n" not in str(err.value)


def test_full_store_gives_the_live_teachers_first_step_loss(setup, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, path, _, vocab = setup
    store = root / "store_full"
    main(
        ["data", "store-teacher", "-c", str(path), "--output", str(store), "--k", str(vocab)]
        + ["--value_dtype", "float32", "--stages", "train"]
    )
    live = _fit(path)["train/loss"]
    stored = _fit(path, f"--model.init_args.token_store={store}")["train/loss"]
    torch.testing.assert_close(stored, live, rtol=1e-5, atol=0)


def test_what_a_store_cannot_serve_is_refused(setup):
    _, _, folder, vocab = setup
    kw = dict(num_classes=vocab, token_store="unused", generate_samples=0)
    spec = TeacherSpec(model=f"hf:{folder}")
    with pytest.raises(ConfigError, match="model.on_policy"):
        LMDistillationModule("llama", TINY, spec, on_policy=OnPolicySpec(lmbda=0.5), **kw)
    with pytest.raises(ConfigError, match="model.sequence_kd"):
        from kd_lightning.modules.lm_distillation import SequenceKDSpec

        LMDistillationModule("llama", TINY, spec, sequence_kd=SequenceKDSpec(), **kw)
    with pytest.raises(ConfigError, match="model.chunk_size"):
        LMDistillationModule("llama", TINY, spec, chunk_size=8, **kw)
