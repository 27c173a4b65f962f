"""`qatune bench`: training throughput of the native backend against transformers (+ peft), measured in one
process (`runner.py`, method in its docstring), over the shapes and steps of `setups.py`; `checks.py` holds the
GPU checks of `benchmarks/gpu_check.sh`."""

from qatune.utils.lazy import lazy_exports

_EXPORTS = {
    "BenchConfig": "qatune.bench.setups",
    "fast_path_agreement": "qatune.bench.checks",
    "run_bench": "qatune.bench.runner",
    "sdpa_kernels": "qatune.bench.checks",
}
__all__ = ["BenchConfig", "fast_path_agreement", "run_bench", "sdpa_kernels"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
