"""`qatune compare SWEEP.yaml`: full fine-tuning versus LoRA, measured, on one grid of runs.

A sweep file names a grid (models x methods x LoRA ranks x seeds, plus the untrained base models), the
training config every run shares (`base`, a `train` config as a mapping) and how to evaluate. Each run
trains in its own `python -m qatune train` process, so a killed sweep leaves only files that `train` itself
leaves consistent (atomic checkpoints, summary.json written last), and every run's peak memory is its own.

Resuming is rerunning: a run with `summary.json` and `eval/metrics.json` is done and never touched again; a
run with checkpoints but no summary resumes from its last checkpoint (`resume=true`, exact); a trained run
without evaluation is only evaluated.

Layout under OUT: `data/` (slices), `configs/NAME.yaml` (each run's train config), `runs/NAME/` (train's run
directory + `eval/` + `train.log`), `sweep.json` (wall time of each invocation), `results.json`, `report.md`
and the plots. Sweep keys are documented in `configs/sweeps/*.yaml`.
"""

from __future__ import annotations

import copy
import ctypes
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from qatune.compare.report import model_label, write_report
from qatune.data.readers import resolve_data
from qatune.errors import ConfigError, QatuneError
from qatune.evaluation.measure import evaluate, resolve_task
from qatune.generation.decode import GenerationConfig
from qatune.training.config import load_config
from qatune.utils.env import machine_info
from qatune.utils.io import atomic_write_text

SWEEP_KEYS = {"name", "description", "models", "methods", "ranks", "seeds", "zero_shot", "base",
              "method_overrides", "eval", "slices"}
EVAL_KEYS = {"data", "format", "max_examples", "task", "batch_size", "template", "generation", "loss"}
METHODS = ("full", "lora")


@dataclass
class Run:
    """One cell of the grid. `method` is "zero-shot" for an untrained base model (evaluation only)."""

    model: str
    method: str
    rank: int | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        label = model_label(self.model)
        if self.method == "zero-shot":
            return f"{label}-zero-shot"
        return f"{label}-{self.method}" + (f"-r{self.rank}" if self.rank else "") + f"-s{self.seed}"


@dataclass
class Sweep:
    path: Path
    name: str
    description: str
    runs: list[Run]
    base: dict[str, Any]
    method_overrides: dict[str, dict[str, Any]]
    eval: dict[str, Any]
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def train_config(self, run: Run, run_dir: Path) -> dict[str, Any]:
        """`base`, then the method's overrides, then what the grid cell fixes."""
        cfg = _merge(self.base, self.method_overrides.get(run.method, {}))
        cfg.update(model=run.model, method=run.method, out=str(run_dir))
        cfg.setdefault("train", {})["seed"] = run.seed
        if run.method == "lora":
            cfg.setdefault("lora", {})["r"] = run.rank
        return cfg


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every run's train config is validated before anything runs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown sweep key(s) {sorted(unknown)}; valid: {sorted(SWEEP_KEYS)}")
    ev = raw.get("eval") or {}
    if "data" not in ev or set(ev) - EVAL_KEYS:
        raise ConfigError(f"{p}: `eval` needs `data` and takes only {sorted(EVAL_KEYS)}")
    methods = raw.get("methods", list(METHODS))
    if set(methods) - set(METHODS):
        raise ConfigError(f"{p}: methods must be among {METHODS}, got {methods}")
    models, seeds, ranks = raw.get("models") or [], raw.get("seeds", [0]), raw.get("ranks", [8])
    if not models:
        raise ConfigError(f"{p}: `models` must list at least one model")
    runs = [Run(m, "zero-shot") for m in models] if raw.get("zero_shot", False) else []
    for model in models:
        for method in methods:
            for rank in (ranks if method == "lora" else [None]):
                runs += [Run(model, method, rank, seed) for seed in seeds]
    sweep = Sweep(p, raw.get("name", p.stem), raw.get("description", ""), runs, raw.get("base") or {},
                  raw.get("method_overrides") or {}, ev, raw.get("slices") or {})
    GenerationConfig(**ev.get("generation", {}))  # fail now on a bad decoding option, not after training
    return sweep


def run_sweep(path: str | Path, out: str | Path | None = None) -> Path:
    """Run (or resume) every run of the sweep, then write results.json and report.md; returns the report path."""
    started = time.time()
    sweep = load_sweep(path)
    out = Path(out or Path("runs") / "compare" / sweep.name)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    paths = _write_slices(sweep, out / "data")
    sweep.base, sweep.eval = _substitute(sweep.base, paths), _substitute(sweep.eval, paths)
    trained = [run for run in sweep.runs if run.method != "zero-shot"]
    for run in trained:  # validate every config up front: a typo should not surface after an hour of training
        config_path = out / "configs" / f"{run.name}.yaml"
        atomic_write_text(config_path, yaml.safe_dump(sweep.train_config(run, out / "runs" / run.name),
                                                      sort_keys=False))
        load_config(config_path).resolved()

    try:
        for i, run in enumerate(sweep.runs, start=1):
            run_dir = out / "runs" / run.name
            tag = f"[{i}/{len(sweep.runs)}] {run.name}"
            if run.method != "zero-shot" and not (run_dir / "summary.json").is_file():
                _log(f"{tag}: training (log: {run_dir / 'train.log'})")
                _train(out / "configs" / f"{run.name}.yaml", run_dir)
                _record_invocation(out / "sweep.json", started)
            if (run_dir / "eval" / "metrics.json").is_file():
                _log(f"{tag}: done, skipped")
                continue
            _log(f"{tag}: evaluating on {sweep.eval['data']}")
            _evaluate(sweep, run, run_dir)
            _record_invocation(out / "sweep.json", started)
    finally:
        _record_invocation(out / "sweep.json", started)
    results = collect_results(sweep, out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    report = write_report(results, out)
    _log(f"report: {report}")
    return report


def _train(config_path: Path, run_dir: Path) -> None:
    """`python -m qatune train` in a child process; resumes from the run's checkpoints when it has any."""
    args = [sys.executable, "-m", "qatune", "train", str(config_path)]
    if (run_dir / "checkpoints").is_dir():
        args.append("resume=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:
        code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None).returncode
    if code != 0:
        tail = "".join((run_dir / "train.log").read_text().splitlines(keepends=True)[-15:])
        raise QatuneError(f"training {run_dir.name} failed (exit {code}); end of {run_dir / 'train.log'}:\n{tail}")


def _die_with_parent() -> None:
    """Linux: the training child is killed when the sweep process dies, so a killed sweep leaves no orphan
    still writing into a run directory that the next invocation will resume."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _evaluate(sweep: Sweep, run: Run, run_dir: Path) -> None:
    """Evaluate a trained run (its own template and max_length) or an untrained model (the sweep's)."""
    ev = sweep.eval
    data = sweep.base.get("data", {})
    zero_shot = run.method == "zero-shot"
    evaluate(run.model if zero_shot else run_dir, ev["data"], out_dir=run_dir / "eval",
             template=ev.get("template") or (data.get("template") if zero_shot else None),
             max_length=data.get("max_length") if zero_shot else None,
             generation=GenerationConfig(**ev.get("generation", {})), batch_size=ev.get("batch_size", 16),
             max_examples=ev.get("max_examples"), task=ev.get("task", "auto"), fmt=ev.get("format", "auto"),
             loss=ev.get("loss", True))


def collect_results(sweep: Sweep, out: Path) -> dict[str, Any]:
    """Everything the report needs, small enough to commit: per run, its summary, scores and loss curve."""
    ev = sweep.eval
    task = resolve_task(ev.get("task", "auto"), ev.get("format", "auto"), ev["data"])
    rows = []
    for run in sweep.runs:
        run_dir = out / "runs" / run.name
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        row: dict[str, Any] = {"name": run.name, "model": run.model, "method": run.method, "rank": run.rank,
                               "seed": run.seed, "eval": {k: v for k, v in metrics.items()
                                                          if k not in ("generation", "template", "source")}}
        row["quality_stderr"], row["empty_predictions"] = _prediction_stats(run_dir / "eval" / "predictions.jsonl",
                                                                            "f1" if task == "qa" else "bleu")
        if run.method != "zero-shot":
            summary = json.loads((run_dir / "summary.json").read_text())
            row.update({k: summary.get(k) for k in ("trainable_params", "total_params", "trainable_percent",
                                                    "peak_memory_bytes", "wall_time_s", "tokens_per_s",
                                                    "best_val_loss", "steps", "early_stopped")})
            row["result_bytes"] = _weights_size(run_dir / ("adapter" if run.method == "lora" else "model"))
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            row["config"] = {"train": {k: config["train"][k] for k in ("epochs", "max_steps", "batch_size",
                                                                      "grad_accum", "lr", "schedule",
                                                                      "warmup_steps")},
                             "data": {k: config["data"][k] for k in ("train", "val", "val_fraction", "max_length",
                                                                     "max_examples", "template")},
                             "lora": config["lora"] if run.method == "lora" else None}
            events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            row["val_curve"] = [[e["step"], e["val_loss"]] for e in events
                                if e.get("event") == "eval" and "val_loss" in e]
        rows.append(row)
    invocations = json.loads((out / "sweep.json").read_text())["invocations"]
    return {"sweep": sweep.name, "environment": machine_info(), "sweep_file": str(sweep.path),
            "description": sweep.description, "task": task,
            "eval": ev, "base": sweep.base, "slices": sweep.slices,
            "seeds": sorted({r.seed for r in sweep.runs if r.seed is not None}),
            "wall_time_s": sum(i["elapsed_s"] for i in invocations), "invocations": len(invocations),
            "runs": rows}


def _weights_size(result: Path) -> int:
    """Bytes of the saved weights and their config. summary.json's `result_bytes` also counts the tokenizer
    files saved alongside, a few MB that would swamp a LoRA adapter's size and hide the ratio that matters:
    what each additional fine-tuned task costs on disk."""
    patterns = ("*.safetensors", "*.bin", "config.json", "adapter_config.json")
    return sum(f.stat().st_size for pattern in patterns for f in result.glob(pattern))


def _prediction_stats(predictions: Path, key: str) -> tuple[float | None, int]:
    """The standard error of the mean per-input score, in points (the sampling noise of a test-set mean),
    and how many predictions are empty (a model that stops at once scores 0 for a reason worth seeing).
    Per-input EM/F1 are fractions (metrics.per_example_qa), sentence BLEU already a percentage."""
    scale = 100.0 if key in ("em", "f1") else 1.0
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line]
    values = [scale * row["scores"][key] for row in rows if row["scores"][key] is not None]
    stderr = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return stderr, sum(not row["prediction"] for row in rows)


def _write_slices(sweep: Sweep, data_dir: Path) -> dict[str, str]:
    """`slices: {NAME: {source, start, stop}}`: lines [start, stop) of a line-based file (JSONL, E2E .txt),
    written to `data/NAME<suffix>` so that `slice:NAME` can stand for a fixed, documented split."""
    paths = {}
    for name, spec in sweep.slices.items():
        source = Path(resolve_data(spec["source"]))
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[spec.get("start", 0):spec.get("stop")]
        target = data_dir / f"{name}{source.suffix}"
        data_dir.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text(encoding="utf-8") != "".join(lines):
            atomic_write_text(target, "".join(lines))
        paths[f"slice:{name}"] = str(target)
    return paths


def _substitute(node: Any, paths: dict[str, str]) -> Any:
    """`slice:NAME` strings anywhere in a config replaced by the slice's file."""
    if isinstance(node, dict):
        return {k: _substitute(v, paths) for k, v in node.items()}
    if isinstance(node, str) and node.startswith("slice:"):
        if node not in paths:
            raise ConfigError(f"{node}: no such slice (defined: {sorted(paths) or 'none'})")
        return paths[node]
    return node


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge, `extra` winning; inputs are not modified."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _record_invocation(path: Path, started: float) -> None:
    """This invocation's wall time so far, updated after every training and evaluation: the report states the
    sweep's total wall time even when it took several invocations (a killed one counts up to its last
    finished step)."""
    record = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    stamp = datetime.fromtimestamp(started, timezone.utc).isoformat()
    record["invocations"] = [i for i in record["invocations"] if i["started"] != stamp]
    record["invocations"].append({"started": stamp, "elapsed_s": time.time() - started})
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
