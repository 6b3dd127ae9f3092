"""Loss heads. Each file holds one method; import it here so YAML can use short paths."""

from kd_lightning.losses.base import LossHead
from kd_lightning.losses.ce import CrossEntropy
from kd_lightning.losses.kd import KLDivergence
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from kd_lightning.losses.schedules import Constant, LinearWarmup, Schedule, StepWarmup

__all__ = [
    "Constant",
    "CrossEntropy",
    "KLDivergence",
    "LinearWarmup",
    "LossHead",
    "ModelOutput",
    "Schedule",
    "StepWarmup",
    "TeacherOutput",
]
