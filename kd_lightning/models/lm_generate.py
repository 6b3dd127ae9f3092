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
  ``{"prompt_token_ids": ...}`` prompts). ``vllm`` is imported only inside
  ``VLLMGenerate.__init__``: ``import kd_lightning`` and the ``hf`` engine never import it.
  The engine is built from the model's config alone (``load_format="dummy"``, no
  tokenizer: prompts go in as token ids) and the model's weights are copied into it
  before a generation whenever ``weights_version`` changed (the student: its optimizer
  step count; the frozen teacher: once). Coded against vLLM 0.34.0's API
  (``LLM.apply_model``, ``LLM.reset_prefix_cache``, ``SamplingParams``,
  ``RequestOutput.outputs[0].token_ids``); ``pip install "kd-lightning[vllm]"`` pins it.
"""

from __future__ import annotations

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
    reads; tied embeddings appear once)."""
    return [(name, p.detach()) for name, p in model.named_parameters()]


class VLLMGenerate:
    """vLLM's ``LLM`` in this process (colocate), synced with the model's weights."""

    name = "vllm"

    def __init__(self, field: str) -> None:
        self.field = field
        # colocate: the engine core runs in this process, so load_weights reads our tensors
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

    def _build(self, model: nn.Module, spec: Any) -> None:
        if hasattr(model, "peft_config") or type(model).__module__.startswith("torch.distributed"):
            raise ConfigError(
                self.field, "vllm", "LoRA or FSDP-sharded models are not synced to vLLM: use hf"
            )
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        dtype = next(model.parameters()).dtype
        config.torch_dtype = dtype
        self._dir = tempfile.TemporaryDirectory(prefix="kd_vllm_")
        config.save_pretrained(self._dir.name)
        kwargs = {
            "model": self._dir.name,
            "skip_tokenizer_init": True,
            "load_format": "dummy",  # the weights come from the model (sync), not a file
            "dtype": str(dtype).removeprefix("torch."),
            "seed": int(getattr(spec, "seed", 0)),
            "gpu_memory_utilization": 0.3,  # colocated with training, as TRL's default
            **(getattr(spec, "vllm_kwargs", None) or {}),
        }
        self.llm = self._vllm.LLM(**kwargs)

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
        if self.llm is None:
            self._build(model, spec)
        self.sync(model, weights_version)
        rows = model.get_output_embeddings().weight.shape[0]
        params = self._vllm.SamplingParams(**vllm_sampling_kwargs(spec, eos_id, real_vocab, rows))
        outputs = self.llm.generate(vllm_prompts(ids, attention), params, use_tqdm=False)
        return vllm_completions(outputs, ids.device)

    def close(self) -> None:
        """Free the engine (the teacher's, after sequence KD wrote its generations)."""
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
    "vllm_prompts",
    "vllm_sampling_kwargs",
    "vllm_weights",
]
