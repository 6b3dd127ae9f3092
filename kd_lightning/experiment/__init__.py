"""Experiments: teacher → scratch and KD students over seeds → a results table and plots.

``kd-lightning experiment --config configs/experiments/quickstart.yaml`` (see ``runner``).
"""

from kd_lightning.experiment.results import aggregate, load_results, mean_std
from kd_lightning.experiment.runner import Experiment, main
from kd_lightning.experiment.spec import ExperimentSpec, Stage, TeacherStage, parse_spec

__all__ = [
    "Experiment", "ExperimentSpec", "Stage", "TeacherStage",
    "aggregate", "load_results", "main", "mean_std", "parse_spec",
]
