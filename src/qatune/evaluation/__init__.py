"""Measuring a model: metrics checked against their reference implementations (`metrics.py`), teacher-forced
loss (`loss.py`), `qatune eval` (`measure.py`: `evaluate`), and multiple-choice scoring, acc and acc_norm
(`multiple_choice.py`: `evaluate_multiple_choice`, `score_multiple_choice` for a loaded model)."""

from qatune.evaluation.loss import evaluate_loss
from qatune.evaluation.measure import evaluate, generation_metrics, resolve_task
from qatune.evaluation.multiple_choice import evaluate_multiple_choice, load_mc, score_multiple_choice

__all__ = ["evaluate", "evaluate_loss", "evaluate_multiple_choice", "generation_metrics", "load_mc", "resolve_task",
           "score_multiple_choice"]
