from kd_lightning.callbacks.checkpoint import KDModelCheckpoint
from kd_lightning.callbacks.lm_eval import LMEvalCallback
from kd_lightning.callbacks.preemption import PreemptionCheckpoint
from kd_lightning.callbacks.test_every_epoch import TestEveryEpoch

__all__ = ["KDModelCheckpoint", "LMEvalCallback", "PreemptionCheckpoint", "TestEveryEpoch"]
