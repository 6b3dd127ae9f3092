from kd_lightning.callbacks.checkpoint import KDModelCheckpoint
from kd_lightning.callbacks.preemption import PreemptionCheckpoint

__all__ = ["KDModelCheckpoint", "PreemptionCheckpoint"]
