"""Generation engines for on-policy training and sequence-level KD (``engine: hf | vllm``).

One interface: ``engine.generate(model, ids, attention, spec, pad_id=, eos_id=, real_vocab=,
weights_version=)`` takes the prompts *left-padded* (``left_padded_prompts``) and returns,
per row, the generated token ids (a 1-D tensor, possibly with padding after the first EOS,
which the caller cuts with ``completion_mask``). ``spec`` is an ``OnPolicySpec`` or a
``SequenceKDSpec`` (temperature, top_p, max_new_tokens, generation_batch_size, seed,
vllm_kwargs).

- ``hf``: the model's own ``generate`` with a KV cache, in chunks of
  ``generation_batch_size`` prompts (the default; the code that was in
  ``LMDistillationModule.sample``, unchanged).
- ``vllm``: vLLM's offline ``LLM`` engine in "colocate" mode (in this process, on the
  training GPU), as TRL runs it (huggingface/trl@f2cd577 trl/generation/vllm_generation.py
  L351-L368: ``LLM(...)`` built once; L387-L392 and L444-L501: every parameter pushed into
  the engine's model through ``load_weights``, then ``reset_prefix_cache``; L613-L683:
  ``SamplingParams(n=1, temperature, top_p, max_tokens)`` and ``llm.generate`` on
  ``{"prompt_token_ids": ...}`` prompts; trl/experimental/distillation/distillation_trainer.py
  L679-L702: the student's prompts without their left padding, its weights synced when the
  optimizer step count changed). ``vllm`` is imported only inside ``VLLMGenerate.__init__``:
  ``import kd_lightning`` and the ``hf`` engine never import it. The engine is built from
  the model's config alone (``load_format="dummy"``, no tokenizer: token ids in, token ids
  out) and the model's weights are copied into it before a generation whenever
  ``weights_version`` changed (the student: its optimizer step count; the frozen teacher:
  once). One process only (no DDP/FSDP, no LoRA: refused in one line). Coded against vLLM
  0.34.0's API, read from its wheel (``LLM.apply_model`` → ``collective_rpc("apply_model")``
  run in-process with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``LLM.reset_prefix_cache``,
  ``SamplingParams(stop_token_ids, allowed_token_ids, detokenize)``,
  ``RequestOutput.outputs[0].token_ids`` ending in the stop token);
  ``pip install "kd-lightning[vllm]"`` pins it. Only the pure helpers below are tested
  here (no GPU): the engine itself runs in ``benchmarks/gpu_vllm_onpolicy.py``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import os
import tempfile
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError

Engine = Literal["hf", "vllm"]
ENGINES = ("hf", "vllm")
VLLM_FIX = (
    'vLLM generation needs vllm and a CUDA GPU: pip install "kd-lightning[vllm]" on a GPU '
    "machine, or use engine: hf"
)
_UNSYNCED = object()


class GenerationEngine(Protocol):
    name: str

    def generate(
        self,
        model: nn.Module,
        ids: Tensor,
        attention: Tensor,
        spec: Any,
        *,
        pad_id: int,
        eos_id: int | None,
        real_vocab: int,
        weights_version: Any = None,
    ) -> list[Tensor]: ...

    def close(self) -> None: ...


def check_engine(name: str, field: str) -> None:
    """Refuse an unknown engine, or ``vllm`` where it cannot run (no vllm, no CUDA), in one
    line, without importing vllm (``find_spec`` only)."""
    if name not in ENGINES:
        raise ConfigError(field, name, f"use one of {', '.join(ENGINES)}")
    if name == "vllm":
        installed = importlib.util.find_spec("vllm") is not None
        if not installed or not torch.cuda.is_available():
            missing = "no CUDA device" if installed else "vllm is not installed"
            raise ConfigError(field, name, f"{missing}; {VLLM_FIX}")


def make_engine(name: str, field: str) -> GenerationEngine:
    check_engine(name, field)
    return HFGenerate() if name == "hf" else VLLMGenerate(field)


class HFGenerate:
    """``model.generate`` (KV cache) on left-padded chunks of ``generation_batch_size``."""

    name = "hf"

    def generate(
        self,
        model: nn.Module,
        ids: Tensor,
        attention: Tensor,
        spec: Any,
        *,
        pad_id: int,
        eos_id: int | None,
        real_vocab: int,
        weights_version: Any = None,
    ) -> list[Tensor]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": spec.max_new_tokens,
            "pad_token_id": pad_id,
            "eos_token_id": eos_id,
            "use_cache": True,
        }
        if spec.temperature > 0:
            kwargs.update(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        rows = model.get_output_embeddings().weight.shape[0]
        if rows > real_vocab:  # a padded table: never sample a token the tokenizer lacks
            kwargs["suppress_tokens"] = list(range(real_vocab, rows))
        size = spec.generation_batch_size or len(ids)
        was_training = model.training
        model.eval()  # no dropout while sampling
        generated: list[Tensor] = []
        try:
            for start in range(0, len(ids), size):
                chunk, chunk_attention = ids[start : start + size], attention[start : start + size]
                cut = int((chunk_attention.sum(0) == 0).sum())  # this chunk's all-pad columns
                out = model.generate(
                    input_ids=chunk[:, cut:], attention_mask=chunk_attention[:, cut:], **kwargs
                )
                generated.extend(out[:, chunk.shape[1] - cut :])
        finally:
            nn.Module.train(model, was_training)
        return generated

    def close(self) -> None:
        pass


# -- vLLM: request building and output conversion (pure, tested against a fake engine) --------
def vllm_prompts(ids: Tensor, attention: Tensor) -> list[dict[str, list[int]]]:
    """vLLM's token prompts: each row's ids without its left padding."""
    return [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in zip(ids, attention)]


def vllm_sampling_kwargs(
    spec: Any, eos_id: int | None, real_vocab: int, rows: int
) -> dict[str, Any]:
    """``SamplingParams`` fields matching the ``hf`` engine's sampling (temperature 0:
    greedy; top_k off; stop at EOS; never a token beyond the tokenizer's vocabulary)."""
    greedy = spec.temperature <= 0
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": 0.0 if greedy else float(spec.temperature),
        "top_p": 1.0 if greedy else float(spec.top_p),
        "max_tokens": int(spec.max_new_tokens),
        "detokenize": False,  # no tokenizer in the engine: token ids in, token ids out
    }
    if eos_id is not None:
        kwargs["stop_token_ids"] = [int(eos_id)]
    if rows > real_vocab:
        kwargs["allowed_token_ids"] = list(range(real_vocab))
    return kwargs


def vllm_completions(outputs: list[Any], device: torch.device | str) -> list[Tensor]:
    """``RequestOutput.outputs[0].token_ids`` of each request, as long tensors (the EOS that
    stopped a request is its last token)."""
    return [
        torch.tensor(list(out.outputs[0].token_ids), dtype=torch.long, device=device)
        for out in outputs
    ]


def vllm_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The model's parameters under their Hugging Face names (what vLLM's ``load_weights``
    reads; tied embeddings appear once, as ``named_parameters`` lists a shared tensor once,
    and vLLM's Llama/Qwen loaders skip ``lm_head`` when the config ties it). Activation
    checkpointing's wrapper prefix is dropped, as TRL's ``_fix_param_name_to_vllm``
    (vllm_generation.py L379-L385)."""
    return [
        (name.replace("_checkpoint_wrapped_module.", ""), p.detach())
        for name, p in model.named_parameters()
    ]


def vllm_dtype(dtype: torch.dtype) -> str:
    """The engine's dtype: the model's when it is bf16/fp16; fp32 weights (``bf16-mixed``
    training) are generated from in bf16, as TRL does (its engine loads the checkpoint's
    dtype and ``load_weights`` casts); ``vllm_kwargs: {dtype: float32}`` overrides it."""
    return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "bfloat16")


def vllm_llm_kwargs(
    model: nn.Module, spec: Any, folder: str, eos_id: int | None = None
) -> dict[str, Any]:
    """``vllm.LLM`` arguments for ``model``: its config written to ``folder`` (with its class
    as the architecture vLLM looks up), random ``dummy`` weights (``sync`` overwrites them),
    no tokenizer, the spec's seed, 0.3 of the GPU (TRL's colocate default, grpo_config.py
    L646-L647), then ``spec.vllm_kwargs``.

    A ``generation_config.json`` holding only ``eos_id`` is written too: without one, vLLM
    0.34.0 makes a generation config from ``config.json`` (transformers_utils/config.py
    ``try_get_generation_config``) and stops at *its* EOS ids as well
    (``SamplingParams.update_from_generation_config``), which the data's tokenizer may use
    as ordinary tokens; the ``hf`` engine stops at ``eos_id`` alone."""
    from transformers import GenerationConfig

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=eos_id).save_pretrained(folder)
    return {
        "model": folder,
        "skip_tokenizer_init": True,
        "load_format": "dummy",
        "dtype": vllm_dtype(next(model.parameters()).dtype),
        "seed": int(getattr(spec, "seed", 0)),
        "gpu_memory_utilization": 0.3,
        **(getattr(spec, "vllm_kwargs", None) or {}),
    }


@contextlib.contextmanager
def _kept_rng():
    """Building an in-process engine reseeds Python's, NumPy's and torch's global RNGs with
    the engine's seed (vllm 0.34.0 v1/worker/gpu_worker.py ``set_random_seed``); the run's
    own streams are put back afterwards."""
    import random

    import numpy as np

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _refuse_unsyncable(model: nn.Module, field: str) -> None:
    from kd_lightning.modules.sharding import is_sharded

    if hasattr(model, "peft_config") or is_sharded(model):
        raise ConfigError(
            field, "vllm", "LoRA or FSDP-sharded models are not synced to vLLM: use hf"
        )
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(
            field, "vllm", "the vllm engine runs in one process here (no DDP/FSDP): use hf"
        )


class VLLMGenerate:
    """vLLM's ``LLM`` in this process (colocate), synced with the model's weights."""

    name = "vllm"

    def __init__(self, field: str) -> None:
        self.field = field
        # colocate: the engine core runs in this process, so load_weights reads our tensors
        # (and apply_model's function is called, not pickled to a worker process)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            import vllm
        except ImportError as err:
            raise ConfigError(field, "vllm", f"{err}; {VLLM_FIX}") from None
        self._vllm = vllm
        self.llm: Any = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._synced: Any = _UNSYNCED
        self.syncs = 0  # how many times the weights were copied in

    def _build(self, model: nn.Module, spec: Any, eos_id: int | None) -> None:
        _refuse_unsyncable(model, self.field)
        self._dir = tempfile.TemporaryDirectory(prefix="kd_vllm_")
        with _kept_rng():
            self.llm = self._vllm.LLM(**vllm_llm_kwargs(model, spec, self._dir.name, eos_id))

    def sync(self, model: nn.Module, version: Any) -> None:
        """Copy the model's weights into the engine unless ``version`` is the last synced
        one (None: always)."""
        if version is not None and version == self._synced:
            return
        weights = vllm_weights(model)
        self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._synced, self.syncs = version, self.syncs + 1

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        ids: Tensor,
        attention: Tensor,
        spec: Any,
        *,
        pad_id: int,
        eos_id: int | None,
        real_vocab: int,
        weights_version: Any = None,
    ) -> list[Tensor]:
        rows = model.get_output_embeddings().weight.shape[0]
        params = vllm_sampling_kwargs(spec, eos_id, real_vocab, rows)
        # vLLM picks its own dtypes: not the training step's autocast (bf16-mixed)
        with torch.autocast(ids.device.type, enabled=False):
            if self.llm is None:
                self._build(model, spec, eos_id)
            self.sync(model, weights_version)
            sampling = self._vllm.SamplingParams(**params)
            outputs = self.llm.generate(vllm_prompts(ids, attention), sampling, use_tqdm=False)
        return vllm_completions(outputs, ids.device)

    def close(self) -> None:
        """Free the engine (the teacher's, after sequence KD wrote its generations)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # the in-process executor and its worker's GPU memory
        self.llm, self._synced = None, _UNSYNCED
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = [
    "ENGINES",
    "Engine",
    "GenerationEngine",
    "HFGenerate",
    "VLLMGenerate",
    "check_engine",
    "make_engine",
    "vllm_completions",
    "vllm_dtype",
    "vllm_llm_kwargs",
    "vllm_prompts",
    "vllm_sampling_kwargs",
    "vllm_weights",
]
