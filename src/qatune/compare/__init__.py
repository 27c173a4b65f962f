"""`qatune compare`: full fine-tuning against LoRA and baselines, measured on the user's data. The sweep file
(`sweep.py`), carrying it out (`run.py`), results.json (`results.py`), paired statistics (`stats.py`), the
report's rows (`rows.py`), and the report with its verdict and plots (`report.py`, `plots.py`)."""

from qatune.utils.lazy import lazy_exports

_EXPORTS = {
    "load_sweep": "qatune.compare.sweep",
    "run_sweep": "qatune.compare.run",
}
__all__ = ["load_sweep", "run_sweep"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
