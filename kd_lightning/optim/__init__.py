"""Optimizers that know about distillation. ``DOT`` keeps separate momentum for the task
and the distillation gradients; use it from YAML as ``model.init_args.optimizer:
{class_path: kd_lightning.optim.DOT, init_args: {lr: 0.05, momentum: 0.9, delta: 0.075}}``.
``SGD`` is torch's SGD with ``no_decay_1d`` (no weight decay on biases and norm layers, as
DIST_KD trains).
"""

from kd_lightning.optim.dot import DOT
from kd_lightning.optim.sgd import SGD

__all__ = ["DOT", "SGD"]
