"""FSDP2 sharding of an LM distiller's student *and* frozen teacher (``fully_shard``).

Lightning's ``ModelParallelStrategy`` (torch's FSDP2: ``torch.distributed.fsdp.fully_shard``)
sets up the process group and a device mesh and then calls ``LightningModule.configure_model``,
where the module shards itself. It runs on CPU with gloo as well as on GPUs with NCCL.
(Lightning's older ``FSDPStrategy``, FSDP1, refuses any accelerator but CUDA in
``AcceleratorConnector._check_strategy_and_fallback``: "The strategy `fsdp` requires a GPU
accelerator", so it is not used here.)

Each decoder layer is one FSDP unit and the whole model (embeddings, final norm, LM head) the
root unit, for the student and, separately, for the teacher. The teacher stays out of the
LightningModule's submodules (``frozen_teacher.py``): it is sharded like the student, so each
rank holds 1/N of its weights, but it has no gradients, no optimizer state and is never in a
checkpoint; it stays in eval mode. The checkpoint is the student's full state dict, gathered
to rank 0 when the strategy has ``save_distributed_checkpoint: false``
(``configs/trainer/fsdp*.yaml``).

The chunked loss (``chunk_size > 0``) calls the decoder's backbone and reads the LM head's
weight outside the sharded root's forward, where FSDP has not gathered them: it is refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.errors import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (``model.model.layers`` for Llama/Qwen/
    Mistral, ``transformer.h`` for GPT-2); [] when none is found (the root unit then holds
    everything)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, (nn.ModuleList, list)):
            return list(obj)
    return []


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_lm(model: nn.Module, mesh: Any, *, frozen: bool = False, **kwargs: Any) -> nn.Module:
    """``fully_shard`` each decoder layer, then the whole model, over ``mesh`` (idempotent:
    Lightning calls ``configure_model`` again for validate/test after fit)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    if frozen:
        model.eval()
        model.requires_grad_(False)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def reshard_frozen(model: nn.Module) -> None:
    """FSDP2 keeps the root unit gathered after forward until backward reshards it; a frozen
    teacher has no backward, so ``teacher_output`` reshards it once its outputs are copied
    out (else each rank would keep the full embeddings and LM head)."""
    if is_sharded(model):
        model.reshard()


def shard_distiller(module: Any, mesh: Any) -> None:
    """Shard ``module.student`` and its frozen ``module.teacher`` over the mesh's
    data-parallel dimension (``configure_model`` of ``LMDistillationModule``)."""
    if mesh is None:  # not a ModelParallelStrategy: nothing to shard
        return
    if module.chunk_size > 0:
        raise ConfigError(
            "model.chunk_size",
            module.chunk_size,
            "the chunked loss reads the LM head outside the sharded forward; set "
            "model.chunk_size: 0 with an FSDP strategy",
        )
    if getattr(module, "lora", None) is not None:
        raise ConfigError(
            "model.lora", "set", "LoRA students are not sharded; use DDP (configs/trainer/ddp.yaml)"
        )
    dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    shard_lm(module.student, dp)
    shard_lm(module.teacher, dp, frozen=True)
