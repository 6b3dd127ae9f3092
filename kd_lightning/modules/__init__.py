"""LightningModules: supervised classifier and knowledge distillation."""

from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distillation import DistillationModule
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import TeacherSpec

__all__ = ["ClassifierModule", "DistillationModule", "Performance", "TeacherSpec"]
