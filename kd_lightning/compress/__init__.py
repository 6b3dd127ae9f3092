"""After distillation: prune, KD fine-tune, quantize and export a student (``kd-lightning compress``)."""

from kd_lightning.compress.export import ExportCheck, ExportConfig
from kd_lightning.compress.pipeline import CompressResult, compress, load_student, main
from kd_lightning.compress.prune import (
    FinetuneConfig,
    PruneConfig,
    kd_finetune,
    make_permanent,
    prune_model,
    weight_sparsity,
)
from kd_lightning.compress.quantize import QuantizeConfig, quantize_dynamic, quantize_static
from kd_lightning.compress.report import BenchmarkConfig, ModelReport, WandbConfig, count_params

__all__ = [
    "BenchmarkConfig",
    "CompressResult",
    "ExportCheck",
    "ExportConfig",
    "FinetuneConfig",
    "ModelReport",
    "PruneConfig",
    "QuantizeConfig",
    "WandbConfig",
    "compress",
    "count_params",
    "kd_finetune",
    "load_student",
    "main",
    "make_permanent",
    "prune_model",
    "quantize_dynamic",
    "quantize_static",
    "weight_sparsity",
]
