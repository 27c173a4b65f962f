"""LoRA variants (DoRA, PiSSA, OLoRA) as methods of a sweep: trained as LoRA with their keys, reported as rows
of their own, and named in the verdict against full fine-tuning and plain LoRA."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml

from qatune.compare.report import verdict
from qatune.compare.rows import ReportRow
from qatune.compare.sweep import load_sweep
from qatune.training.config import config_from_dict


def _sweep(tmp_path: Path, **keys) -> Path:
    sweep = {"models": ["m"], "methods": ["full", "lora", "dora", "pissa"], "ranks": [8], "seeds": [0],
             "eval": {"data": "sample-test"}, "base": {"data": {"train": "sample"}}} | keys
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_variants_train_as_lora_with_their_keys_and_lora_grid(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, grid={"lora": {"train.lr": [1e-3, 3e-3]}},
                              method_overrides={"lora": {"lora": {"alpha": 32}}, "dora": {"train": {"lr": 5e-4}}}))
    names = [run.name for run in sweep.candidates()]
    assert names == ["m-full-s0", "m-lora-r8-lr0.001-s0", "m-lora-r8-lr0.003-s0", "m-dora-r8-lr0.001-s0",
                     "m-dora-r8-lr0.003-s0", "m-pissa-r8-lr0.001-s0", "m-pissa-r8-lr0.003-s0"]
    by_name = {run.name: sweep.train_config(run, tmp_path / run.name) for run in sweep.candidates()}
    dora, pissa = by_name["m-dora-r8-lr0.003-s0"], by_name["m-pissa-r8-lr0.001-s0"]
    assert dora["method"] == pissa["method"] == "lora"
    assert dora["lora"] == {"alpha": 32, "use_dora": True, "r": 8} and dora["train"]["lr"] == 3e-3  # grid wins
    assert pissa["lora"] == {"alpha": 32, "init": "pissa", "r": 8}
    for config in by_name.values():  # every one is a valid run config
        config_from_dict(config).resolved()
    own = load_sweep(_sweep(tmp_path, methods=["lora", "dora"], grid={"lora": {"train.lr": [1e-3, 3e-3]},
                                                                   "dora": {"train.lr": [1e-2]}}))
    assert [run.name for run in own.candidates()][-1] == "m-dora-r8-lr0.01-s0"


def _row(method: str, rank: int | None, scores: np.ndarray, validation: float, step_s: float) -> ReportRow:
    row = {"item_scores": {"test": {"f1": list(scores)}}, "trainable_params": 1e5, "trainable_percent": 0.1,
           "result_bytes": 1e6, "peak_memory_bytes": 1e9 * (1.1 if method == "dora" else 1.0),
           "wall_time_s": 100 * step_s, "steps": 100, "point": {}, "validation": {"f1": validation}}
    return ReportRow(method, rank, [row])


def test_the_verdict_names_the_variant_validation_prefers():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 100, 400)
    noisy = lambda shift: np.clip(difficulty + shift + rng.normal(0, 2, 400), 0, 100)
    zero = _row("zero-shot", None, np.clip(difficulty - 30, 0, 100), 5.0, 0)
    full = _row("full", None, noisy(0), 20.0, 2.0)
    lora = _row("lora", 8, noisy(-4), 15.0, 1.0)
    dora = _row("dora", 8, noisy(0), 19.0, 1.3)
    pissa = _row("pissa", 8, noisy(-4), 25.0, 1.0)  # best on validation, not on test: still the one named
    text = "\n".join(verdict([zero, full, lora, dora, pissa], {"task": "qa", "extra_eval": [],
                                                                "select_metric": "f1"}))
    variants = next(line for line in text.splitlines() if line.startswith("- **Variants.**"))
    by_label = dict(re.findall(r"(\w+ r=8) ([+-]\d+\.\d) \[", variants.split("The validation set")[0]))
    assert set(by_label) == {"LoRA r=8", "DoRA r=8", "PiSSA r=8"} and float(by_label["LoRA r=8"]) == -4.0
    assert abs(float(by_label["DoRA r=8"])) < 0.5
    assert "The validation set prefers PiSSA r=8 (validation f1 25)" in variants
    assert "PiSSA r=8 trails full fine-tuning by 4." in variants
    assert "PiSSA r=8 and LoRA r=8 are indistinguishable" in variants
    costs = next(line for line in text.splitlines() if line.startswith("- **Costs.**"))
    assert "DoRA r=8 takes 1.30x LoRA r=8's time per step and 1.10x its peak memory" in costs
    assert "PiSSA r=8 takes 1.00x" in costs
    assert "Variants" not in "\n".join(verdict([zero, full, lora], {"task": "qa", "extra_eval": [],
                                                                     "select_metric": "f1"}))
