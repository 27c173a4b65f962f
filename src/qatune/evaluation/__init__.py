"""Measuring a model: metrics checked against their reference implementations (`metrics.py`), teacher-forced
loss (`loss.py`), `qatune eval` (`measure.py`: `evaluate`), and multiple-choice scoring, acc and acc_norm
(`multiple_choice.py`: `evaluate_multiple_choice`, `score_multiple_choice` for a loaded model)."""

from qatune.utils.lazy import lazy_exports

_EXPORTS = {
    "evaluate": "qatune.evaluation.measure",
    "evaluate_loss": "qatune.evaluation.loss",
    "evaluate_multiple_choice": "qatune.evaluation.multiple_choice",
    "generation_metrics": "qatune.evaluation.measure",
    "load_mc": "qatune.evaluation.multiple_choice",
    "resolve_task": "qatune.evaluation.measure",
    "score_multiple_choice": "qatune.evaluation.multiple_choice",
}
__all__ = ["evaluate", "evaluate_loss", "evaluate_multiple_choice", "generation_metrics", "load_mc", "resolve_task",
           "score_multiple_choice"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
