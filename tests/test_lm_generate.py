"""Generation engines (``model.on_policy.engine`` / ``model.sequence_kd.engine``, issue 24):
``vllm`` is refused in one line where it cannot run and never imported unless asked for; the
request building and output conversion of the vLLM engine (pure functions: vLLM itself needs
a CUDA GPU and is not installed here); the ``hf`` engine samples exactly what the generate
loop it replaced sampled (the old ``LMDistillationModule.sample``, kept below verbatim)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.models.lm_generate import (
    HFGenerate,
    check_engine,
    make_engine,
    vllm_completions,
    vllm_dtype,
    vllm_llm_kwargs,
    vllm_prompts,
    vllm_sampling_kwargs,
    vllm_weights,
)
from kd_lightning.modules.lm_distillation import (
    OnPolicySpec,
    SequenceKDSpec,
    completion_mask,
    left_padded_prompts,
    pack_sequences,
    prompt_lengths,
)
from tests.test_lm_module import TINY, V, _window
from tests.test_lm_onpolicy import _module

REPO = Path(__file__).resolve().parents[1]
VLLM_RUNS_HERE = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
no_vllm = pytest.mark.skipif(VLLM_RUNS_HERE, reason="vllm and a GPU are here: engine vllm is valid")


# -- (a) engine: vllm where it cannot run: one line naming the field -----------------------------
@no_vllm
def test_vllm_engine_without_vllm_is_one_line_naming_the_field():
    for field in ("model.on_policy.engine", "model.sequence_kd.engine"):
        with pytest.raises(ConfigError) as info:
            check_engine("vllm", field)
        assert info.value.field == field and "\n" not in str(info.value)
        assert "kd-lightning[vllm]" in str(info.value) and "engine: hf" in str(info.value)
    with pytest.raises(ConfigError, match="model.on_policy.engine"):
        _module(engine="vllm")
    with pytest.raises(ConfigError, match="use one of hf, vllm"):
        OnPolicySpec(1.0, engine="sglang").check()
    with pytest.raises(ConfigError, match="model.on_policy.engine"):
        make_engine("vllm", "model.on_policy.engine")
    assert isinstance(make_engine("hf", "model.on_policy.engine"), HFGenerate)


@no_vllm
def test_vllm_engine_from_the_console_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from kd_lightning.cli import console_main

    monkeypatch.chdir(tmp_path)  # the data module's folder, if it makes one
    config = REPO / "configs" / "llm" / "quickstart" / "kd_onpolicy.yaml"
    argv = ["kd-lightning", "fit", "-c", str(config), "--model.init_args.on_policy.engine=vllm"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kd-lightning:")]
    assert len(lines) == 1 and "model.on_policy.engine='vllm'" in lines[0], err
    assert "Traceback" not in err


# -- (b) import kd_lightning + an hf on-policy fit never imports vllm ----------------------------
HF_FIT = """
import functools, sys
import lightning as L, torch
from torch.utils.data import DataLoader
import kd_lightning
from kd_lightning.errors import ConfigError
from kd_lightning.losses.lm import TokenDivergence
from kd_lightning.models.lm_generate import check_engine
from kd_lightning.modules.lm_distillation import LMDistillationModule, OnPolicySpec
from kd_lightning.modules.teacher import TeacherSpec
from tests.test_lm_module import TINY, V, _window
torch.manual_seed(0)
module = LMDistillationModule(
    "llama", TINY,
    TeacherSpec(model="llama", model_kwargs={**TINY, "num_hidden_layers": 1}, allow_untrained=True),
    heads=[TokenDivergence(1.0, "jsd", beta=0.5)], num_classes=V, generate_samples=0,
    on_policy=OnPolicySpec(lmbda=1.0, temperature=1.0, max_new_tokens=4, engine="hf"),
    optimizer=functools.partial(torch.optim.SGD, lr=0.1),
)
trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
trainer.fit(module, train_dataloaders=DataLoader([_window(0), _window(1)], batch_size=None))
try:
    check_engine("vllm", "model.on_policy.engine")  # asks for vllm: find_spec, no import
except ConfigError:
    pass
print("RESULT", trainer.global_step, type(module._engines["model.on_policy"]).__name__,
      "vllm" in sys.modules, any(m.startswith("vllm.") for m in sys.modules))
"""


@pytest.mark.slow  # a fresh interpreter: ~25 s of imports on 2 shared cores
def test_hf_on_policy_fit_never_imports_vllm():
    out = subprocess.run(
        [sys.executable, "-c", HF_FIT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT 2 HFGenerate False False"], out.stdout[-2000:]


# -- (c) the vLLM engine's pure helpers ------------------------------------------------------------
def test_vllm_prompts_are_the_rows_without_their_left_padding():
    batch = _window()
    batch["labels"][0, :] = -100  # a row without completion: its whole sequence is the prompt
    ids, attention = left_padded_prompts(batch, pad_id=0)
    prompts = vllm_prompts(ids, attention)
    lens = prompt_lengths(batch).tolist()
    assert lens[0] == 24 and len(set(lens)) > 1  # rows of different prompt lengths
    assert [list(p) for p in prompts] == [["prompt_token_ids"]] * 8
    for i, n in enumerate(lens):
        assert prompts[i]["prompt_token_ids"] == batch["input_ids"][i, :n].tolist()
        assert all(isinstance(t, int) for t in prompts[i]["prompt_token_ids"])


def test_vllm_sampling_kwargs_greedy_sampling_and_padded_vocab():
    greedy = vllm_sampling_kwargs(OnPolicySpec(1.0, temperature=0.0, top_p=0.5), 2, V, V)
    assert greedy == {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,  # greedy: nucleus off, as hf's do_sample=False
        "max_tokens": 32,
        "detokenize": False,
        "stop_token_ids": [2],
    }
    spec = SequenceKDSpec(temperature=0.7, top_p=0.9, max_new_tokens=5)
    sampled = vllm_sampling_kwargs(spec, None, 61, 64)  # no EOS; 3 padding rows in the table
    assert sampled == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 5,
        "detokenize": False,
        "allowed_token_ids": list(range(61)),  # hf: suppress_tokens 61, 62, 63
    }
    assert "top_k" not in sampled  # vLLM's default 0 = off, as hf's top_k=0


@dataclass
class FakeCompletion:  # vllm.outputs.CompletionOutput's fields that are read
    token_ids: tuple[int, ...]


@dataclass
class FakeRequestOutput:  # vllm.outputs.RequestOutput's
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]


def test_vllm_completions_equal_the_cut_hf_rows():
    eos = pad = 2  # pad == eos, as the quickstart tokenizer without a pad token
    # vLLM stops a request at the stop token and returns it last; a length-capped one has none
    vllm_rows = [(5, 6, 2), (7, 8, 9, 10), (2,), (4, 3, 3, 2)]
    outputs = [FakeRequestOutput([1, 1], [FakeCompletion(t)]) for t in vllm_rows]
    got = vllm_completions(outputs, "cpu")
    assert [g.dtype for g in got] == [torch.long] * 4
    assert [g.tolist() for g in got] == [list(r) for r in vllm_rows]
    # hf's generate returns the same completions as one right-padded block
    hf_block = torch.tensor([[5, 6, 2, 2], [7, 8, 9, 10], [2, 2, 2, 2], [4, 3, 3, 2]])
    hf_cut = [g[completion_mask(g[None], eos)[0]] for g in hf_block]
    vllm_cut = [g[completion_mask(g[None], eos)[0]] for g in got]  # what sample() does
    assert [c.tolist() for c in vllm_cut] == [c.tolist() for c in hf_cut]
    prompts = [torch.tensor([9, 9, 9]), torch.tensor([8]), torch.tensor([7, 7]), torch.tensor([6])]
    packed = pack_sequences(prompts, vllm_cut, pad)
    assert packed["input_ids"].shape == (4, 6)  # the longest: 3 + 3
    for i, (p, c) in enumerate(zip(prompts, vllm_cut)):
        assert packed["labels"][i].tolist() == [-100] * len(p) + c.tolist() + [-100] * (
            6 - len(p) - len(c)
        )


def _llama(tie: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, tie_word_embeddings=tie, **TINY))


@pytest.mark.parametrize("tie", [True, False])
def test_vllm_weights_are_the_hf_names_tied_embeddings_once(tie):
    model = _llama(tie)
    weights = vllm_weights(model)
    names = [n for n, _ in weights]
    state = model.state_dict()
    assert len(names) == len(set(names)) and set(names) <= set(state)
    # tied: lm_head.weight is the embedding's tensor, sent once (vLLM skips lm_head then)
    assert set(state) - set(names) == ({"lm_head.weight"} if tie else set())
    assert ("lm_head.weight" in names) is not tie
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert all(
        n.startswith(("model.layers.", "model.embed", "model.norm", "lm_head")) for n in names
    )
    for name, tensor in weights:  # the parameters themselves: no copy, no grad
        assert tensor.data_ptr() == state[name].data_ptr() and not tensor.requires_grad


def test_vllm_llm_kwargs_write_the_models_config(tmp_path):
    from transformers import AutoConfig, GenerationConfig

    model = _llama(tie=True).to(torch.bfloat16)
    own = model.config.architectures
    spec = OnPolicySpec(1.0, seed=7, vllm_kwargs={"gpu_memory_utilization": 0.5})
    model.config.eos_token_id = 2  # the config's EOS is an ordinary token of the data
    kwargs = vllm_llm_kwargs(model, spec, str(tmp_path), eos_id=5)
    assert kwargs == {
        "model": str(tmp_path),
        "skip_tokenizer_init": True,
        "load_format": "dummy",
        "dtype": "bfloat16",
        "seed": 7,
        "gpu_memory_utilization": 0.5,  # the spec's vllm_kwargs win
    }
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == ["LlamaForCausalLM"] and config.vocab_size == V
    assert config.tie_word_embeddings and config.num_hidden_layers == TINY["num_hidden_layers"]
    assert model.config.architectures == own  # a copy was written, the model's is untouched
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 32
    # what vLLM reads for its extra stop ids (try_get_generation_config().to_diff_dict()):
    # the EOS the hf engine stops at, not the config's
    generation = GenerationConfig.from_pretrained(tmp_path).to_diff_dict()
    assert generation["eos_token_id"] == 5
    vllm_llm_kwargs(model, spec, str(tmp_path / "none"), eos_id=None)
    assert (
        GenerationConfig.from_pretrained(tmp_path / "none").to_diff_dict().get("eos_token_id")
        is None
    )
    assert [vllm_dtype(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == [
        "bfloat16",
        "float16",
        "bfloat16",
    ]


# -- (d) the hf engine = the generate loop it replaced, bit for bit ------------------------------
def _old_sample(module, model, batch, spec):
    """``LMDistillationModule.sample`` at 10013ab (before engines), verbatim but for ``self``."""
    pad, eos = module.special_ids()
    ids, attention = left_padded_prompts(batch, pad)
    kwargs: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "use_cache": True,
    }
    if spec.temperature > 0:
        kwargs.update(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows > module.real_vocab:
        kwargs["suppress_tokens"] = list(range(module.real_vocab, rows))
    size = spec.generation_batch_size or len(ids)
    was_training = model.training
    model.eval()
    generated = []
    try:
        for start in range(0, len(ids), size):
            chunk, chunk_attention = ids[start : start + size], attention[start : start + size]
            cut = int((chunk_attention.sum(0) == 0).sum())
            out = model.generate(
                input_ids=chunk[:, cut:], attention_mask=chunk_attention[:, cut:], **kwargs
            )
            generated.extend(out[:, chunk.shape[1] - cut :])
    finally:
        nn.Module.train(model, was_training)
    lens = prompt_lengths(batch).tolist()
    prompts = [batch["input_ids"][i, :n] for i, n in enumerate(lens)]
    return prompts, [g[completion_mask(g[None], eos)[0]] for g in generated]


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=1.0, top_p=0.9, generation_batch_size=3),
        dict(temperature=0.0, generation_batch_size=0),
    ],
)
def test_hf_engine_samples_what_the_old_generate_loop_sampled(sampling):
    module = _module()
    module.on_policy = OnPolicySpec(1.0, max_new_tokens=8, **sampling)
    module.student.resize_token_embeddings(V + 8)  # a padded table: suppress_tokens in play
    module.student.train()
    batch = _window()
    module.student.config.eos_token_id = V - 1
    torch.manual_seed(1234)
    _, first = module.sample(module.student, batch, module.on_policy, "model.on_policy")
    module.student.config.eos_token_id = int(first[0][2])  # some rows now stop early
    results = []
    for sample in (
        lambda: module.sample(module.student, batch, module.on_policy, "model.on_policy"),
        lambda: _old_sample(module, module.student, batch, module.on_policy),
    ):
        torch.manual_seed(1234)
        prompts, completions = sample()
        after = torch.rand(3)  # the RNG advanced by the same draws
        results.append(([p.tolist() for p in prompts], [c.tolist() for c in completions], after))
        assert module.student.training  # put back in training mode
    (new_p, new_c, new_rng), (old_p, old_c, old_rng) = results
    assert new_p == old_p and new_c == old_c and torch.equal(new_rng, old_rng)
    lens = [len(c) for c in new_c]
    assert min(lens) < 8 and max(lens) <= 8  # EOS cut somewhere
    assert all(t < V for c in new_c for t in c)  # never a padding row
    # a teacher (sequence KD) goes through the same engine
    spec = SequenceKDSpec(max_new_tokens=4, generation_batch_size=2)
    torch.manual_seed(0)
    new = module.sample(module.teacher, batch, spec, "model.sequence_kd")
    torch.manual_seed(0)
    old = _old_sample(module, module.teacher, batch, spec)
    assert [c.tolist() for c in new[1]] == [c.tolist() for c in old[1]]


# -- the GPU check: one line without CUDA; its loop, smoke-run on CPU with hf in both seats -------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_vllm_benchmark_without_cuda_is_one_line(monkeypatch, capsys):
    from benchmarks import gpu_vllm_onpolicy

    monkeypatch.setattr(sys, "argv", ["gpu_vllm_onpolicy"])
    with pytest.raises(SystemExit) as info:
        gpu_vllm_onpolicy.main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "kd-lightning[vllm]" in err


def test_gpu_vllm_benchmark_smoke_on_cpu(monkeypatch, tmp_path):
    from benchmarks import gpu_vllm_onpolicy

    out = tmp_path / "r.json"
    argv = ["gpu_vllm_onpolicy", "--accelerator", "cpu", "--batch", "2", "--prompt", "8"]
    argv += ["--max-new-tokens", "4", "--warmup", "1", "--steps", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    gpu_vllm_onpolicy.main()
    result = json.loads(out.read_text())
    assert len(result["per_step"]) == 3 and result["provenance"]["command"].startswith(
        "python -m benchmarks."
    )
    assert [r["trained_on"] for r in result["per_step"]] == ["hf", "vllm", "hf"]  # alternating
    assert [r["first"] for r in result["per_step"]] == ["hf", "vllm", "hf"]
    for key in ("median_step_ratio_hf_over_vllm", "median_gen_hf_s", "median_rest_s"):
        assert 0 < result[key] < float("inf"), key
    for when in ("before", "after"):  # the same engine in both seats: the same argmax share
        check = result["greedy_checks"][when]
        assert check["hf_argmax_share"] == check["vllm_argmax_share"] == 1.0, check
