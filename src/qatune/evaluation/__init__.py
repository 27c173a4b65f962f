"""Measuring a model: metrics checked against their reference implementations (`metrics.py`), teacher-forced
loss (`loss.py`), and `qatune eval` (`measure.py`: `evaluate`)."""

from qatune.evaluation.loss import evaluate_loss
from qatune.evaluation.measure import evaluate, generation_metrics, resolve_task

__all__ = ["evaluate", "evaluate_loss", "generation_metrics", "resolve_task"]
