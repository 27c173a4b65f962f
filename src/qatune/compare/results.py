"""results.json: everything the report needs from a finished sweep, small enough to commit.

Per run: what it is (model, method, rank, seed, grid point), what training measured (summary.json: parameters,
memory, time, validation loss and curve), and what each evaluation measured, with the per-item scores
(`item_scores`) that the paired statistics of the report resample.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qatune.compare.sweep import VALIDATION, Point, Run, Sweep, point_dict, trains_lora
from qatune.evaluation.measure import resolve_task
from qatune.runs.layout import EvalDir, RunDir
from qatune.utils.env import machine_info

_SUMMARY_KEYS = ("trainable_params", "total_params", "trainable_percent", "peak_memory_bytes", "wall_time_s",
                 "tokens_per_s", "best_val_loss", "steps", "early_stopped")
_ITEM_KEYS = {"qa": ("f1", "em", "contains"), "nlg": ("bleu", "rouge_l"), "mc": ("acc", "acc_norm")}


def selection_value(run_dir: Path, metric: str) -> float | None:
    """The best value of `metric` over a run's evaluations (metrics.jsonl): lowest val_loss, highest em/f1/bleu."""
    return best_value(_evaluations(RunDir(run_dir)), metric)


def best_value(evals: list[dict[str, Any]], metric: str) -> float | None:
    """The best value of `metric` over evaluation records: lowest val_loss, highest em/f1/contains/bleu."""
    values = [e[metric] for e in evals if e.get(metric) is not None]
    if not values:
        return None
    return min(values) if metric == "val_loss" else max(values)


def _evaluations(run_dir: RunDir) -> list[dict[str, Any]]:
    """A run's `eval` records from metrics.jsonl, read once."""
    return [e for e in (json.loads(line) for line in _lines(run_dir.metrics)) if e.get("event") == "eval"]


def collect_results(sweep: Sweep, out: Path, picks: dict[tuple[str, str, int | None], Point]) -> dict[str, Any]:
    ev = sweep.eval
    task = resolve_task(ev.task, ev.format, ev.data)
    finals = sweep.finals(picks)
    rows = [_evaluated_row(sweep, out, run, task) for run in sweep.baselines() + finals]
    tried = [_candidate_row(sweep, out, run, run in finals) for run in sweep.candidates()]
    invocations = json.loads((out / "sweep.json").read_text())["invocations"]
    return {"sweep": sweep.name, "environment": machine_info(), "sweep_file": str(sweep.path),
            "description": sweep.description, "task": task, "eval": asdict(ev),
            "extra_eval": [asdict(spec) for spec in sweep.extra_eval], "base": sweep.base,
            "slices": {name: asdict(spec) for name, spec in sweep.slices.items()}, "seeds": sweep.seeds,
            "few_shot": sweep.few_shot, "select_metric": sweep.select_metric,
            "wall_time_s": sum(i["elapsed_s"] for i in invocations), "invocations": len(invocations),
            "training": _training_budget(out, sweep.candidates() + [r for r in finals if r not in sweep.candidates()]),
            "runs": rows, "selection": tried}


def _training_budget(out: Path, trained: list[Run]) -> dict[str, Any]:
    """How many trainings the sweep ran (grid points and seeds), their summed training time, and the part of
    it spent answering validation questions (selecting on answers costs that)."""
    dirs = [RunDir(out / "runs" / run.name) for run in trained]
    summaries = [json.loads(d.summary.read_text()) for d in dirs]
    generate = sum(e.get("generate_s") or 0.0 for d in dirs for e in _evaluations(d))
    return {"runs": len(trained), "wall_time_s": sum(s.get("wall_time_s") or 0.0 for s in summaries),
            "generate_s": generate}


def _evaluated_row(sweep: Sweep, out: Path, run: Run, task: str) -> dict[str, Any]:
    run_dir = RunDir(out / "runs" / run.name)
    metrics = json.loads(run_dir.eval.metrics.read_text())
    row: dict[str, Any] = {
        "name": run.name, "model": run.model, "method": run.method, "rank": run.rank, "seed": run.seed,
        "point": point_dict(run.point), "shots": run.shots, "prompt_format": run.prompt_format,
        "eval": {k: v for k, v in metrics.items() if k not in ("generation", "template", "source")},
        "item_scores": {"test": _item_scores(run_dir.eval, task)}, "extra": {},
    }
    row["empty_predictions"] = sum(not p["prediction"] for p in _predictions(run_dir.eval))
    row["validation"] = _validation(sweep, run, run_dir)
    for spec in sweep.extra_eval if run.method != "k-shot" else []:
        where = run_dir.eval_named(spec.name)
        extra = json.loads(where.metrics.read_text())
        row["extra"][spec.name] = {k: v for k, v in extra.items() if isinstance(v, (int, float))}
        row["item_scores"][spec.name] = _item_scores(where, spec.task)
    if run.trained:
        row.update(_training_facts(run_dir, run))
    return row


def _validation(sweep: Sweep, run: Run, run_dir: RunDir) -> dict[str, Any]:
    """The validation scores a row is compared on before any test score is read: a training's best of its
    evaluations (what picked it), a baseline's answers to the same validation questions (what makes it the bar)."""
    if run.trained:
        evals = _evaluations(run_dir)
        return {metric: best_value(evals, metric) for metric in dict.fromkeys((sweep.select_metric, "val_loss"))}
    where = run_dir.eval_named(VALIDATION)
    if not where.metrics.is_file():
        return {}
    found = json.loads(where.metrics.read_text())
    return {k: v for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _training_facts(run_dir: RunDir, run: Run) -> dict[str, Any]:
    summary = json.loads(run_dir.summary.read_text())
    facts: dict[str, Any] = {k: summary.get(k) for k in _SUMMARY_KEYS}
    facts["result_bytes"] = _weights_size(run_dir.result_for("lora" if trains_lora(run.method) else run.method))
    config = run_dir.read_config()
    facts["config"] = {
        "train": {k: config["train"].get(k) for k in ("epochs", "max_steps", "batch_size", "grad_accum", "lr",
                                                      "schedule", "warmup_steps")},
        "data": {k: config["data"].get(k) for k in ("train", "val", "val_fraction", "max_length", "max_examples",
                                                    "template", "prompt_format")},
        "lora": config["lora"] if trains_lora(run.method) else None,
    }
    facts["val_curve"] = [[e["step"], e["val_loss"]] for e in _evaluations(run_dir) if "val_loss" in e]
    return facts


def _candidate_row(sweep: Sweep, out: Path, run: Run, picked: bool) -> dict[str, Any]:
    """A grid point as the study reads it: its best validation loss and generation metric, their curves over
    the steps, what it trained, and what answering the validation questions cost it."""
    run_dir = RunDir(out / "runs" / run.name)
    evals = _evaluations(run_dir)
    summary = json.loads(run_dir.summary.read_text())
    metric = sweep.select_metric
    return {"name": run.name, "model": run.model, "method": run.method, "rank": run.rank,
            "point": point_dict(run.point), "picked": picked,
            metric: best_value(evals, metric), "val_loss": best_value(evals, "val_loss"),
            "curve": [{k: e.get(k) for k in ("step", "val_loss", metric)} for e in evals],
            "trainable_params": summary.get("trainable_params"), "wall_time_s": summary.get("wall_time_s"),
            "generate_s": sum(e.get("generate_s") or 0.0 for e in evals)}


def _item_scores(eval_dir: EvalDir, task: str) -> dict[str, list[float]]:
    """Per-item scores in points (0-100) in the data's order, for the paired statistics: QA F1/EM/contains,
    sentence BLEU/ROUGE-L, or multiple-choice correctness (acc, acc_norm). An evaluation made before `contains`
    existed has none; the report shows "-" for it."""
    rows = _predictions(eval_dir)
    if task == "mc":
        return {"acc": [100.0 * r["correct_acc"] for r in rows], "acc_norm": [100.0 * r["correct_norm"] for r in rows]}
    scale = 1.0 if task == "nlg" else 100.0
    return {key: [scale * (r["scores"][key] or 0.0) for r in rows] for key in _ITEM_KEYS[task]
            if all(key in r["scores"] for r in rows)}


def _predictions(eval_dir: EvalDir) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(eval_dir.predictions)]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _weights_size(result: Path) -> int:
    """Bytes of the saved weights and their config. summary.json's `result_bytes` also counts the tokenizer
    files saved alongside, a few MB that would swamp a LoRA adapter's size and hide the ratio that matters:
    what each additional fine-tuned task costs on disk."""
    patterns = ("*.safetensors", "*.bin", "config.json", "adapter_config.json")
    return sum(f.stat().st_size for pattern in patterns for f in result.glob(pattern))
