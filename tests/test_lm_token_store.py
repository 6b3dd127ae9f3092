"""The top-k token store (kd_lightning.modules.lm_token_store): at k = V (fp32) it gives the
live teacher's loss; at k < V its three tails are exact; its header refuses another teacher,
tokenizer or chat template, and a batch that is not the stored data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm.divergences import forward_kl, generalized_jsd, total_variation
from kd_lightning.models.lm import build_causal_lm
from kd_lightning.modules.lm_token_store import (
    LMTokenStore,
    store_fingerprint,
    store_token_loss,
    write_token_store,
)
from tests.helpers.lm import tiny_llama

TINY = tiny_llama(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from kd_lightning.data.lm import EOS, PAD, PromptCompletionDataModule

    root = tmp_path_factory.mktemp("lm_store")
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
    for split, part in (("train", rows[:16]), ("val", rows[16:])):
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
    tok.save_pretrained(str(root / "tok"))
    dm = PromptCompletionDataModule(
        data_files=files,
        tokenizer=str(root / "tok"),
        data_dir=str(root / "cache"),
        max_length=32,
        min_completion=8,
        batch_size=4,
    )
    dm.setup("fit")
    torch.manual_seed(0)
    teacher = build_causal_lm("llama", len(dm.tokenizer), TINY).eval()
    return root, dm, teacher


def batch_of(dm, stage, index):
    from kd_lightning.data.lm import PromptCompletionCollator

    batch = PromptCompletionCollator(dm.tokenizer.pad_token_id)(
        [dm.splits[stage][i] for i in index]
    )
    targets = batch["labels"][:, 1:]
    return batch, targets != -100, targets


def test_store_at_full_vocabulary_gives_the_live_teachers_loss(data):
    root, dm, teacher = data
    vocab = len(dm.tokenizer)
    store = write_token_store(
        root / "full", teacher, dm, k=vocab, value_dtype="float32", batch_size=5
    )
    assert store.meta["stages"]["train"]["samples"] == 16
    index = [7, 0, 13, 2]  # any order: rows are found through the offsets
    batch, mask, targets = batch_of(dm, "train", index)
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ][mask]
    rows = store.batch_rows("train", torch.tensor(index), mask, targets)
    student = torch.randn(int(mask.sum()), vocab, generator=torch.Generator().manual_seed(1))
    for tail in ("uniform", "drop", "bucket"):
        for name, fn, kw in (
            ("forward_kl", forward_kl, {}),
            ("jsd", generalized_jsd, {"beta": 0.5}),
            ("tvd", total_variation, {}),
        ):
            got = store_token_loss(student, rows, name, tail, **kw)
            torch.testing.assert_close(got, fn(student, live, **kw), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        store_token_loss(student, rows, "forward_kl", "uniform", temperature=2.0),
        forward_kl(student, live, temperature=2.0),
        rtol=1e-5,
        atol=1e-6,
    )
    dense = store.dense_logits("train", torch.tensor(index), mask, targets)
    torch.testing.assert_close(dense[mask].softmax(-1), live.softmax(-1), rtol=1e-5, atol=1e-7)


def test_topk_store_tails_are_exact_and_small(data):
    root, dm, teacher = data
    vocab, k = len(dm.tokenizer), 5
    store = write_token_store(root / "k5", teacher, dm, k=k, value_dtype="float32", stages=["val"])
    index = [3, 1]
    batch, mask, targets = batch_of(dm, "val", index)
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"]).logits[:, :-1][mask].log_softmax(-1)
    rows = store.batch_rows("val", torch.tensor(index), mask, targets)
    top, ids = live.topk(k, -1)
    tail = live.scatter(-1, ids, -torch.inf).logsumexp(-1)
    torch.testing.assert_close(rows.tail, tail, rtol=1e-6, atol=1e-6)
    student = torch.randn(len(live), vocab, generator=torch.Generator().manual_seed(2))
    s = student.log_softmax(-1)
    # drop: KL to the renormalised top-k; uniform: tail mass over the other V − k tokens;
    # bucket: (k + 1)-way distributions
    dropped = torch.full_like(live, -torch.inf).scatter(-1, ids, top)
    uniform = (tail[:, None] - np.log(vocab - k)).expand_as(live).clone().scatter(-1, ids, top)
    s_bucket = torch.cat(
        [s.gather(-1, ids), s.scatter(-1, ids, -torch.inf).logsumexp(-1, True)], -1
    )
    t_bucket = torch.cat([top, tail[:, None]], -1)
    for tail_mode, teacher_ref, student_ref in (
        ("drop", dropped, student),
        ("uniform", uniform, student),
        ("bucket", t_bucket, s_bucket),
    ):
        torch.testing.assert_close(
            store_token_loss(student, rows, "forward_kl", tail_mode),
            forward_kl(student_ref, teacher_ref),
            rtol=1e-5,
            atol=1e-6,
        )
    # the (k + 1) buckets hold all the mass: the bucketed teacher sums to one
    torch.testing.assert_close(t_bucket.exp().sum(-1), torch.ones(len(live)))
    with pytest.raises(ConfigError, match="temperature"):
        store_token_loss(student, rows, "forward_kl", "bucket", temperature=2.0)
    # fp16 values: k·(4 + 2) + 4 (tail) + 4 (next token) bytes per token, plus offsets/header
    small = write_token_store(root / "k5h", teacher, dm, k=k, stages=["val"])
    assert k * 6 + 8 <= small.nbytes_per_token() < k * 6 + 8 + 120
    fp16 = small.batch_rows("val", torch.tensor(index), mask, targets)
    torch.testing.assert_close(fp16.values, rows.values, rtol=1e-3, atol=1e-2)


def test_mismatched_store_or_data_is_refused_in_one_line(data):
    root, dm, teacher = data
    store = write_token_store(root / "fp", teacher, dm, k=3, stages=["val"])
    here = store_fingerprint(teacher, dm.tokenizer)
    assert LMTokenStore(root / "fp", here).k == 3
    torch.manual_seed(5)
    other = build_causal_lm("llama", len(dm.tokenizer), TINY)
    checks = [
        (store_fingerprint(other, dm.tokenizer), "another teacher"),
        ({**here, "tokenizer": "0" * 16}, "another tokenizer"),
        ({**here, "chat_template": "abc"}, "another chat template"),
    ]
    for fingerprint, message in checks:
        with pytest.raises(ConfigError, match=message) as err:
            LMTokenStore(root / "fp", fingerprint)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no token store"):
        LMTokenStore(root / "missing")
    with pytest.raises(ConfigError, match="already there"):
        write_token_store(root / "fp", teacher, dm, k=3, stages=["val"])
    batch, mask, targets = batch_of(dm, "val", [0, 1])
    with pytest.raises(ConfigError, match="not the one it was written for"):
        store.batch_rows("val", torch.tensor([1, 0]), mask, targets)  # rows swapped
    with pytest.raises(ConfigError, match="no 'train' stage"):
        store.rows("train", [0])
    with pytest.raises(ConfigError, match="beyond"):
        store.rows("val", [99])
