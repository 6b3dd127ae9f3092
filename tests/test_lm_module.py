"""Causal-LM modules: token accounting, the shared frozen-teacher core, data and refusals."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm import TokenCrossEntropy, TokenDivergence
from kd_lightning.modules.frozen_teacher import FrozenTeacherModule
from kd_lightning.modules.lm_distillation import CausalLMModule, LMDistillationModule
from kd_lightning.modules.teacher import TeacherSpec
from tests.helpers.lm import tiny_llama

V = 64
TINY = tiny_llama(2)


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _window(seed=0):
    """8 sequences whose completions have very different lengths (1 to 20 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (8, 24), generator=g)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate([20, 1, 3, 12, 2, 7, 15, 5]):
        labels[i, 24 - n :] = ids[i, 24 - n :]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _split(batch, parts):
    size = 8 // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _one_step(tmp_path, parts):
    torch.manual_seed(0)
    module = CausalLMModule(
        "llama",
        TINY,
        num_classes=V,
        generate_samples=0,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=1, accumulate_grad_batches=parts, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(_split(_window(), parts), batch_size=None))
    # SGD with lr 1: the update is the gradient of the step's loss
    return {k: before[k] - v for k, v in module.state_dict().items()}


def test_gradient_is_invariant_to_the_micro_batch_split(tmp_path):
    whole, halves, quarters = (_one_step(tmp_path, p) for p in (1, 2, 4))
    for k in whole:
        torch.testing.assert_close(halves[k], whole[k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(quarters[k], whole[k], rtol=1e-4, atol=1e-7)
    # the per-micro-batch mean (what a naive loss.mean() + 1/accumulate gives) is not
    torch.manual_seed(0)
    module = CausalLMModule("llama", TINY, num_classes=V)
    grads = []
    for parts in (1, 4):
        module.zero_grad()
        for mb in _split(_window(), parts):
            out = module.lm_output(module.model, mb, hidden=False)
            (TokenCrossEntropy()(out, None, mb) / out.mask.sum() / parts).backward()
        grads.append(module.model.lm_head.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1], rtol=1e-2)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    from kd_lightning.data.lm import MovieReviewsLMDataModule

    root = tmp_path_factory.mktemp("lm")
    dm = MovieReviewsLMDataModule(
        data_dir=str(root / "data"),
        vocab_size=400,
        max_length=64,
        min_completion=12,
        batch_size=8,
        eval_batch_size=32,
        max_train_examples=64,
        max_eval_examples=32,
        val_films=4,
        test_films=4,
    )
    dm.setup()
    return dm, root


def test_movie_review_data_masks_the_prompt_and_saves_a_tokenizer_folder(lm_data):
    dm, root = lm_data
    batch = next(iter(dm.train_dataloader()))
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] <= 64 and len(dm.tokenizer) == dm.num_classes <= 400
    row = 0
    completion = labels[row] != -100
    text = dm.tokenizer.decode(ids[row][attention[row].bool() & ~completion])
    assert text.rstrip().endswith("Review:")  # the prompt is cut from the left
    assert completion.sum() >= 1 and not (completion & (attention == 0)[row]).any()
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(dm.tokenizer_dir)  # a standard tokenizer folder
    assert again.get_vocab() == dm.tokenizer.get_vocab()
    films = {
        split: {dm.references[split][i][0] for i in range(len(dm.splits[split]))}
        for split in ("train", "val", "test")
    }
    assert not films["train"] & films["test"] and not films["train"] & films["val"]


def test_teacher_student_kd_share_the_frozen_core_and_evaluate(lm_data, tmp_path):
    dm, _ = lm_data
    torch.manual_seed(0)
    teacher = CausalLMModule(
        "llama", TINY, num_classes=dm.num_classes, generate_samples=2, max_new_tokens=8
    )
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, limit_test_batches=1)
    trainer.fit(teacher, dm)
    ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)
    student_kwargs = {**TINY, "num_hidden_layers": 1}
    kd = LMDistillationModule(
        "llama",
        student_kwargs,
        TeacherSpec(checkpoint=str(ckpt)),
        heads=[TokenDivergence(0.5, "jsd", beta=0.5), TokenCrossEntropy(0.5)],
        init_from_teacher="every_kth",
        chunk_size=16,
        num_classes=dm.num_classes,
        generate_samples=2,
        max_new_tokens=8,
    )
    assert isinstance(kd, FrozenTeacherModule)
    assert not any(k.startswith("teacher") for k in kd.state_dict())  # not in checkpoints
    assert all(not p.requires_grad for p in kd.teacher.parameters())
    assert kd.init_report is not None and kd.init_report.copied_tensors > 0
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, limit_test_batches=1)
    trainer.fit(kd, dm)
    (result,) = trainer.test(kd, dm, verbose=False)
    for key in ("nll", "ppl", "teacher_nll", "kl", "reverse_kl", "jsd", "rougeL", "teacher_rougeL"):
        assert torch.isfinite(torch.tensor(result[f"test/{key}"])), key
    assert result["test/kl"] >= 0 and result["test/reverse_kl"] >= 0
    # the greedy completions' statistics, recomputed here from the same completions
    from kd_lightning.modules.lm_eval_stats import distinct_n, exposure_bias, mean_length, words

    student = kd.greedy_completions(kd.student, "test")
    oracle = kd.greedy_completions(kd.teacher, "test")
    assert len(student) == 2 and all(len(g["completion"]) <= 8 for g in student)
    assert result["test/gen_len"] == pytest.approx(mean_length([g["completion"] for g in student]))
    assert result["test/teacher_gen_len"] == pytest.approx(
        mean_length([g["completion"] for g in oracle])
    )
    for n in (1, 2):
        value = distinct_n(words([g["text"] for g in student]), n)
        assert value is None or result[f"test/distinct_{n}"] == pytest.approx(value)
    stats = exposure_bias(kd.prefix_kl(kd.teacher, student), kd.prefix_kl(kd.teacher, oracle), 8)
    assert stats is None or result["test/exposure_bias"] == pytest.approx(stats["exposure_bias"])
    # step 1 of both prefix sets reads the prompt alone: the same KL from either model's run
    kl_s, kl_t = kd.prefix_kl(kd.teacher, student), kd.prefix_kl(kd.teacher, oracle)
    for a, b in zip(kl_s, kl_t, strict=True):
        if len(a) and len(b):
            assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-4, abs=1e-6)
    saved = (
        torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
        if trainer.checkpoint_callback
        else None
    )
    assert saved is None or saved["kd_teacher_fingerprints"] == kd.teacher_fingerprints
    # bits per byte: the test NLL sums over the UTF-8 bytes of the decoded completions (one
    # test batch), the teacher's on the same bytes
    batch = next(iter(dm.test_dataloader()))
    completion = batch["labels"][:, 1:] != -100
    text_bytes = sum(
        len(dm.tokenizer.decode(row[keep], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False).encode())
        for row, keep in zip(batch["labels"][:, 1:], completion, strict=True)
    )
    tokens = int(completion.sum())
    for nll, bpb in (("nll", "bpb"), ("teacher_nll", "teacher_bpb")):
        expected = result[f"test/{nll}"] * tokens / text_bytes / math.log(2)
        assert result[f"test/{bpb}"] == pytest.approx(expected, rel=1e-5), bpb


def test_no_bits_per_byte_without_a_byte_level_tokenizer(tmp_path):
    # a DataLoader without a datamodule (no tokenizer): per-token metrics only
    module = CausalLMModule("llama", TINY, num_classes=V, generate_samples=0)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, limit_test_batches=1)
    trainer.fit(module, train_dataloaders=DataLoader(_Rows(), batch_size=4))
    (result,) = trainer.test(module, DataLoader(_Rows(), batch_size=4), verbose=False)
    assert "test/nll" in result and "test/bpb" not in result


def test_a_teacher_of_another_tokenizer_is_refused_in_one_line(lm_data, tmp_path):
    dm, _ = lm_data
    module = CausalLMModule("llama", TINY, num_classes=dm.num_classes)
    ckpt = tmp_path / "t.ckpt"
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, dm)
    trainer.save_checkpoint(ckpt)
    kd = LMDistillationModule(
        "llama", TINY, TeacherSpec(checkpoint=str(ckpt)), num_classes=dm.num_classes
    )
    dm.tokenizer_digest, digest = "another", dm.tokenizer_digest
    try:
        with pytest.raises(ConfigError, match="another tokenizer"):
            _trainer(tmp_path, max_steps=1).fit(kd, dm)
    finally:
        dm.tokenizer_digest = digest


def test_padded_vocabularies_are_cut_to_the_real_one():
    # a teacher whose embedding table is padded past the tokenizer (as Qwen's 151,936 rows
    # for 151,665 tokens): logits and head rows beyond the real vocabulary are dropped
    teacher = CausalLMModule("llama", {**TINY, "vocab_size": V + 8}, num_classes=V)
    assert teacher.model.get_output_embeddings().weight.shape[0] == V + 8
    out = teacher.lm_output(teacher.model, _window(), hidden=False)
    assert out.logits.shape[-1] == V and out.head_weight.shape[0] == V
    student = CausalLMModule("llama", TINY, num_classes=V)
    s_out = student.lm_output(student.model, _window(), hidden=False)
    assert TokenDivergence()(s_out, out, {}) > 0


class _Rows(torch.utils.data.Dataset):
    """The window's 8 sequences, one row per item (default collation stacks them)."""

    def __init__(self) -> None:
        self.batch = _window()

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _update(tmp_path, batch_size, accumulate, **trainer_kwargs):
    torch.manual_seed(0)
    module = CausalLMModule(
        "llama",
        TINY,
        num_classes=V,
        generate_samples=0,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(
        tmp_path,
        max_steps=1,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(_Rows(), batch_size=batch_size))
    return {k: before[k] - v for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_gradient_is_invariant_to_the_rank_split_under_gloo_ddp(tmp_path):
    # 8 sequences in one step: one process with the whole window, against 2 gloo ranks
    # each accumulating 2 micro-batches of 2 (the DistributedSampler interleaves the rows)
    whole = _update(tmp_path / "one", 8, 1)
    ddp = _update(tmp_path / "ddp", 2, 2, strategy="ddp_spawn", devices=2)
    for k in whole:
        torch.testing.assert_close(ddp[k], whole[k], rtol=1e-4, atol=1e-7)


def test_hf_folder_teacher_with_its_tokenizer_is_checked_against_the_data(lm_data, tmp_path):
    dm, _ = lm_data
    folder = tmp_path / "hf-teacher"
    CausalLMModule("llama", TINY, num_classes=dm.num_classes).model.save_pretrained(folder)
    dm.tokenizer.save_pretrained(folder)
    kd = LMDistillationModule(
        "llama",
        TINY,
        TeacherSpec(model=f"hf:{folder}"),
        num_classes=dm.num_classes,
        generate_samples=0,
    )
    assert kd.teacher.kd_tokenizer == dm.tokenizer_digest  # the same tokenizer: accepted
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(kd, dm)
    with pytest.raises(ConfigError, match="model.teacher"):
        LMDistillationModule(
            "llama",
            TINY,
            TeacherSpec(model=f"hf:{tmp_path / 'missing'}"),
            num_classes=dm.num_classes,
        )


def test_local_jsonl_chat_and_prompt_completion_rows(lm_data, tmp_path):
    import json

    from kd_lightning.data.lm import PromptCompletionDataModule

    dm, _ = lm_data
    folder = tmp_path / "tok"
    dm.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    dm.tokenizer.save_pretrained(folder)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Rate film {i}."},
                        {"role": "assistant", "content": " A fine film."},
                    ]
                }
            )
            for i in range(6)
        )
    )
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "\n".join(
            json.dumps({"prompt": "Plot: a heist.\nReview:", "completion": " Tense."})
            for _ in range(4)
        )
    )
    data = PromptCompletionDataModule(
        {"train": str(chat), "val": str(plain), "test": str(plain)},
        tokenizer=str(folder),
        data_dir=str(tmp_path / "cache"),
        max_length=32,
        min_completion=8,
        batch_size=3,
    )
    data.setup()
    batch = next(iter(data.train_dataloader()))
    row = batch["labels"][0]
    completion = dm.tokenizer.decode(row[row != -100])
    assert completion == " A fine film." + dm.tokenizer.eos_token
    prompt = dm.tokenizer.decode(
        batch["input_ids"][0][row == -100][: batch["attention_mask"][0].sum()]
    )
    assert prompt.startswith("user: Rate film") and prompt.rstrip().endswith("assistant:")
    assert len(data.splits["val"]) == 4 and data.generation_pairs("test", 2)[0][1] == " Tense."
