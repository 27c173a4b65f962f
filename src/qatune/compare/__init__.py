"""`qatune compare`: full fine-tuning against LoRA and baselines, measured on the user's data. The sweep file
(`sweep.py`), carrying it out (`run.py`), results.json (`results.py`), paired statistics (`stats.py`), the
report's rows (`rows.py`), and the report with its verdict and plots (`report.py`, `plots.py`)."""

from qatune.compare.run import run_sweep
from qatune.compare.sweep import load_sweep

__all__ = ["load_sweep", "run_sweep"]
