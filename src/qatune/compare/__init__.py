"""`qatune compare`: full fine-tuning against LoRA on one grid of runs (`sweep.py`), and the report with its
verdict and plots (`report.py`)."""

from qatune.compare.sweep import load_sweep, run_sweep

__all__ = ["load_sweep", "run_sweep"]
