"""`qatune bench`: training throughput of the native backend against transformers (+ peft), measured in one
process (`runner.py`, method in its docstring), over the shapes and steps of `setups.py`; `checks.py` holds the
GPU checks of `benchmarks/gpu_check.sh`."""

from qatune.bench.checks import fast_path_agreement, sdpa_kernels
from qatune.bench.runner import bench_command, run_bench
from qatune.bench.setups import BenchConfig

__all__ = ["BenchConfig", "bench_command", "fast_path_agreement", "run_bench", "sdpa_kernels"]
