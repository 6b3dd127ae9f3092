"""LightningModules: supervised classifier and knowledge distillation (images, text, causal LMs)."""

from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distillation import DistillationModule
from kd_lightning.modules.lm_distillation import CausalLMModule, LMDistillationModule
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import TeacherSpec

__all__ = [
    "CausalLMModule",
    "ClassifierModule",
    "DistillationModule",
    "LMDistillationModule",
    "Performance",
    "TeacherSpec",
]
