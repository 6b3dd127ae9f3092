from kd_lightning.callbacks.checkpoint import KDModelCheckpoint

__all__ = ["KDModelCheckpoint"]
