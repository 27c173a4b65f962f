"""`qatune compare`: a tiny sweep survives SIGKILL, resumes without redoing finished runs, and reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qatune.compare.report import _test_table, verdict
from qatune.compare.rows import ReportRow
from qatune.compare.run import select
from qatune.compare.sweep import load_sweep
from qatune.errors import QatuneError


def _sweep(tmp_path: Path, model: Path) -> Path:
    sweep = {
        "name": "tiny", "models": [str(model)], "methods": ["full", "lora"], "ranks": [4], "seeds": [0],
        "zero_shot": True,
        "slices": {"train": {"source": "sample", "start": 0, "stop": 60}},
        "base": {"data": {"train": "slice:train", "max_length": 64},
                 "train": {"max_steps": 3, "batch_size": 4, "eval_every": 1, "progress": False}},
        "eval": {"data": "sample-test", "max_examples": 6, "generation": {"max_new_tokens": 3}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _compare(sweep: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qatune", "compare", str(sweep), "--out", str(out)]


def test_sweep_resumes_after_sigkill_and_reports(qa_gpt2_dir, tmp_path):
    sweep, out = _sweep(tmp_path, qa_gpt2_dir), tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    first = out / "runs" / f"{qa_gpt2_dir.name}-full-s0"
    proc = subprocess.Popen(_compare(sweep, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a guard against a hang, not a timing: a busy machine can take minutes
    while not (first / "summary.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its first run finished"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (first / "summary.json").stat()
    assert not (out / "report.md").exists()

    done = subprocess.run(_compare(sweep, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = (first / "summary.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "finished run was redone"
    assert "training" not in [line for line in done.stderr.splitlines() if first.name in line][0]

    runs = ["zero-shot-plain", "full-s0", "lora-r4-s0"]  # the tiny tokenizer has no chat template
    for name in runs:
        assert (out / "runs" / f"{qa_gpt2_dir.name}-{name}" / "eval" / "metrics.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == [f"{qa_gpt2_dir.name}-{n}" for n in runs]
    lora = results["runs"][2]
    assert lora["rank"] == 4 and lora["steps"] == 3
    assert lora["trainable_params"] < results["runs"][1]["trainable_params"]
    assert len(lora["val_curve"]) == 3 and results["invocations"] == 2
    trained = sum(r["wall_time_s"] for r in results["runs"][1:])
    assert results["training"]["runs"] == 2 and results["training"]["wall_time_s"] == pytest.approx(trained)
    assert 0 < results["training"]["generate_s"] < trained  # answering the validation questions, within training

    report = (out / "report.md").read_text()
    assert "| LoRA r=4 |" in report and "| full |" in report and "| zero-shot, plain (the bar) |" in report
    assert "### Verdict" in report and "Conclusion:" in report and "torch " in report
    # contains, from each run's predictions.jsonl, beside F1 and EM, and in the verdict
    rows = [json.loads(line) for line in (first / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert results["runs"][1]["item_scores"]["test"]["contains"] == [100 * r["scores"]["contains"] for r in rows]
    assert "| contains [95% CI] | words per answer |" in report and "- **Knows.** The answer appears" in report
    assert f"- Budget: 2 training run(s) (2 with the first seed: every configuration and grid point; 0 with the " \
           f"other seeds of the picked configurations), {trained / 60:.1f} min of training in all" in report
    for png in ("val-loss", "quality-vs-params", "cost"):
        name = f"{qa_gpt2_dir.name}-{png}.png"
        assert f"]({name})" in report and (out / name).stat().st_size > 1000


def _config(method: str, rank: int | None, per_seed: list[np.ndarray], params: int, size: int,
            validation: float | None = None) -> ReportRow:
    rows = [{"item_scores": {"test": {"f1": list(scores)}}, "trainable_params": params, "trainable_percent":
             100 * params / 135e6, "result_bytes": size, "peak_memory_bytes": 2e9 if method == "full" else 1e9,
             "wall_time_s": 100.0, "point": {}, "validation": {} if validation is None else {"f1": validation}}
            for scores in per_seed]
    return ReportRow(method, rank, rows, shots=3 if method == "k-shot" else 0)


def _verdict(*configs: ReportRow) -> str:
    return "\n".join(verdict(list(configs), {"task": "qa", "extra_eval": []}))


def test_verdict_follows_the_paired_intervals():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 100, 300)
    noisy = lambda shift: np.clip(difficulty + shift + rng.normal(0, 2, 300), 0, 100)
    zero = _config("zero-shot", None, [np.clip(difficulty - 30, 0, 100)], 0, 0, validation=20.0)
    few = _config("k-shot", None, [np.clip(difficulty - 20, 0, 100)], 0, 0, validation=30.0)
    full = _config("full", None, [noisy(0), noisy(0)], 135_000_000, 540_000_000)
    same = _config("lora", 8, [noisy(0), noisy(0)], 460_000, 1_800_000)
    text = _verdict(zero, few, full, same)
    assert "LoRA r=8 and full fine-tuning are indistinguishable" in text and "LoRA is worth it here" in text
    assert f"beat the bar, 3-shot ({few.matrix('test', 'f1').mean():.1f} F1)" in text
    assert f"({full.matrix('test', 'f1').mean() - few.matrix('test', 'f1').mean():+.1f} [" in text  # over the bar
    # the bar is chosen on validation alone: the same test scores, zero-shot better on validation
    zero_first = _config("zero-shot", None, [np.clip(difficulty - 30, 0, 100)], 0, 0, validation=35.0)
    assert f"beat the bar, zero-shot ({zero_first.matrix('test', 'f1').mean():.1f} F1)" in _verdict(zero_first, few,
                                                                                                   full, same)
    assert "0.34% of the parameters" in text and "1/300 of the disk" in text and "0.50x the peak memory" in text

    behind = _config("lora", 8, [noisy(-3), noisy(-3)], 460_000, 1_800_000)
    text = _verdict(zero, few, full, behind)
    assert "LoRA r=8 trails full fine-tuning by 3.0 F1 [2." in text and "full fine-tuning learns more" in text

    flat = [_config(m, 8 if m == "lora" else None, [np.clip(difficulty - 20, 0, 100)], 1, 1) for m in ("full", "lora")]
    assert "fine-tuning is not worth it" in _verdict(zero, few, *flat)


def _with_contains(config: ReportRow, per_seed: list[np.ndarray], words: float) -> ReportRow:
    """`config` also scored by `contains` (0 or 100 per item), with a mean answer length in words per seed."""
    for row, scores in zip(config.rows, per_seed):
        row["item_scores"]["test"]["contains"] = list(scores)
        row.update(eval={"answer_length": words, "inputs": len(scores), "loss": None}, empty_predictions=0)
    return config


def test_knows_follows_the_paired_contains_intervals():
    """Simulated: the untuned model says the answer in sentences (contains 60%), 3-shot less often (40%); full
    fine-tuning keeps what the model knew, LoRA loses a third of it. The sentence compares both with zero-shot,
    the baseline that says the answer most often, through the paired intervals."""
    rng = np.random.default_rng(1)
    n, f1 = 400, np.full(400, 10.0)
    knew = rng.random(n) < 0.6  # the items the base model can answer
    said = lambda mask: np.where(mask, 100.0, 0.0)
    zero = _with_contains(_config("zero-shot", None, [f1], 0, 0), [said(knew)], 14.0)
    few = _with_contains(_config("k-shot", None, [f1], 0, 0), [said(knew & (rng.random(n) < 0.67))], 6.0)
    swapped = knew.copy()  # the second seed forgets 10 answers and finds 10 others: no change on average
    swapped[np.flatnonzero(knew)[:10]], swapped[np.flatnonzero(~knew)[:10]] = False, True
    kept = [said(knew), said(swapped)]
    lost = [said(knew & (rng.random(n) < 0.6)) for _ in range(2)]
    full = _with_contains(_config("full", None, [f1, f1], 135_000_000, 540_000_000), kept, 2.0)
    lora = _with_contains(_config("lora", 8, [f1, f1], 460_000, 1_800_000), lost, 2.5)
    text = _verdict(zero, few, full, lora)
    knows = next(line for line in text.splitlines() if line.startswith("- **Knows.**"))
    assert f"in {said(knew).mean():.1f}% of the answers of zero-shot, the baseline that says it most often" in knows
    full_change = np.mean(kept, axis=0).mean() - said(knew).mean()  # 0: indistinguishable from zero
    lora_change = np.mean(lost, axis=0).mean() - said(knew).mean()  # about -24: clearly below
    assert f"full changes it by {full_change:+.1f} [" in knows
    assert f"LoRA r=8 changes it by {lora_change:+.1f} [" in knows
    lora_part = knows.split("LoRA r=8 changes it by ")[1]
    full_part = knows.split("full changes it by ")[1].split(";")[0]
    assert "includes zero" in full_part and "includes zero" not in lora_part.split(".")[0]
    assert "bounds knowledge from above" in knows
    assert "words per answer: zero-shot 14.0, 3-shot 6.0, full 2.0, LoRA r=8 2.5" in knows

    table = "\n".join(_test_table([zero, few, full, lora], "qa"))
    assert "| F1 [95% CI] | EM [95% CI] | contains [95% CI] | words per answer |" in table
    zero_row = next(line for line in table.splitlines() if line.startswith("| zero-shot (the bar) |"))
    assert f"| {said(knew).mean():.1f} [" in zero_row and "| 14.0 |" in zero_row
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_reports_without_contains_stay_as_they_were():
    """A results.json from before `contains` (or an NLG sweep): no Knows sentence, "-" in the QA columns."""
    scores = np.full(50, 40.0)
    configs = [_config("zero-shot", None, [scores], 0, 0), _config("full", None, [scores], 10, 10),
               _config("lora", 8, [scores], 1, 1)]
    for c in configs:
        for row in c.rows:
            row.update(eval={"inputs": 50}, empty_predictions=0)
    assert "Knows" not in _verdict(*configs)
    table = _test_table(configs, "qa")
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| - | - |" in table[2]
    assert "contains" not in "\n".join(_test_table(configs, "nlg"))


def test_selection_reads_validation_only(tmp_path):
    """The picked grid point never changes when test scores are perturbed, and follows the validation loss."""
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"models": ["m"], "methods": ["lora"], "ranks": [8], "seeds": [0],
                                          "grid": {"lora": {"train.lr": [1e-4, 3e-4, 1e-3]}},
                                          "select": {"metric": "val_loss"}, "eval": {"data": "sample-test"}}))
    sweep, out = load_sweep(sweep_file), tmp_path / "out"
    candidates = sweep.candidates()
    rng = np.random.default_rng(0)

    def write(run, val_loss: float, test_f1: float) -> None:
        run_dir = out / "runs" / run.name
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 1, "val_loss": val_loss}) + "\n")
        (run_dir / "eval" / "metrics.json").write_text(json.dumps({"f1": test_f1}))

    val = [2.0, 1.5, 1.8]
    for run, v in zip(candidates, val):
        write(run, v, 50.0)
    picked = select(sweep, out)
    assert picked == {("m", "lora", 8): (("train.lr", 3e-4),)}
    for _ in range(20):  # any test scores, however extreme: the same pick
        for run, v in zip(candidates, val):
            write(run, v, float(rng.uniform(0, 100)))
        assert select(sweep, out) == picked
    write(candidates[2], 1.0, 0.0)  # a better validation loss moves the pick, even with the worst test score
    assert select(sweep, out) == {("m", "lora", 8): (("train.lr", 1e-3),)}
    assert json.loads((out / "selection.json").read_text())["picked"] == [candidates[2].name]


def test_sweep_file_is_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"models": ["gpt2"], "methods": ["full", "prefix"], "eval": {"data": "x"}}))
    with pytest.raises(QatuneError, match="methods"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"models": ["gpt2"], "eval": {"data": "x"}, "epochs": 3}))
    with pytest.raises(QatuneError, match="unknown sweep key"):
        load_sweep(path)


@pytest.mark.slow
def test_sweep_with_a_grid_baselines_and_extra_sets(qa_gpt2_dir, tmp_path):
    """Selection on validation, a 2-shot baseline, an unseen QA set and a multiple-choice set, end to end."""
    unseen = tmp_path / "unseen.json"
    unseen.write_text(json.dumps([{"qId": f"q{i}", "qText": f"what is item {i}?", "answers": [f"item {i}"]}
                                  for i in range(5)]))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"query": f"Question: pick {i}", "choices": ["yes", "no", "maybe so"],
                                      "gold": i % 3}) + "\n" for i in range(6)))
    sweep = {
        "name": "grid", "models": [str(qa_gpt2_dir)], "methods": ["full", "lora"], "ranks": [4], "seeds": [0, 1],
        "zero_shot": True, "few_shot": 2, "grid": {"lora": {"train.lr": [1e-3, 1e-2]}},
        "slices": {"train": {"source": "sample", "start": 0, "stop": 40}},
        "base": {"data": {"train": "slice:train", "max_length": 64},
                 "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "progress": False}},
        "eval": {"data": "sample-test", "max_examples": 6, "generation": {"max_new_tokens": 3}},
        "extra_eval": [{"name": "unseen", "data": str(unseen), "task": "qa"},
                       {"name": "mc", "data": str(mc), "task": "mc"}],
    }
    path, out = tmp_path / "sweep.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(sweep))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(_compare(path, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    label = qa_gpt2_dir.name
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection["candidates"]) == 3  # full (no grid) + LoRA's two learning rates, first seed only
    picked_lora = [n for n in selection["picked"] if "-lora-" in n]
    assert len(picked_lora) == 2 and {n[-3:] for n in picked_lora} == {"-s0", "-s1"}
    names = [r["name"] for r in results["runs"]]
    assert names[:2] == [f"{label}-zero-shot-plain", f"{label}-2-shot-plain"] and len(names) == 6
    base = results["runs"][0]
    assert len(base["item_scores"]["test"]["f1"]) == 6 and len(base["item_scores"]["unseen"]["f1"]) == 5
    assert len(base["item_scores"]["mc"]["acc_norm"]) == 6 and "mc" not in results["runs"][1]["item_scores"]
    report = (out / "report.md").read_text()
    for text in ("### Learning: the test set", "### Generalisation: unseen", "### Forgetting: mc", "| 2-shot, plain |",
                 "**Learns.**", "**Generalises (unseen).**", "**Forgets (mc).**", "**Costs.**", "**Conclusion:**",
                 "picked on the validation set only", "train.lr=0.01"):
        assert text in report, text
    assert (out / f"{label}-changes.png").stat().st_size > 1000
