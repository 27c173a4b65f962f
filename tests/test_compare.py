"""`qatune compare`: a tiny sweep survives SIGKILL, resumes without redoing finished runs, and reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qatune.compare.report import Config, verdict
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
    deadline = time.time() + 120
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

    runs = ["zero-shot", "full-s0", "lora-r4-s0"]
    for name in runs:
        assert (out / "runs" / f"{qa_gpt2_dir.name}-{name}" / "eval" / "metrics.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == [f"{qa_gpt2_dir.name}-{n}" for n in runs]
    lora = results["runs"][2]
    assert lora["rank"] == 4 and lora["steps"] == 3
    assert lora["trainable_params"] < results["runs"][1]["trainable_params"]
    assert len(lora["val_curve"]) == 3 and results["invocations"] == 2

    report = (out / "report.md").read_text()
    assert "| LoRA r=4 |" in report and "| full |" in report and "| zero-shot |" in report
    assert "### Verdict" in report and "Conclusion:" in report and "torch " in report
    for png in ("val-loss", "quality-vs-params", "cost"):
        name = f"{qa_gpt2_dir.name}-{png}.png"
        assert f"]({name})" in report and (out / name).stat().st_size > 1000


def _config(method: str, rank: int | None, f1s: list[float], params: int, size: int, stderr: float = 1.0) -> Config:
    rows = [{"eval": {"f1": f1}, "quality_stderr": stderr, "trainable_params": params, "result_bytes": size,
             "peak_memory_bytes": 2e9 if method == "full" else 1e9, "wall_time_s": 100.0} for f1 in f1s]
    return Config(method, rank, rows)


def test_verdict_follows_the_numbers():
    zero = _config("zero-shot", None, [2.0], 0, 0)
    full = _config("full", None, [40.0, 42.0], 135_000_000, 540_000_000)
    close = _config("lora", 8, [40.5, 41.0], 460_000, 1_800_000)
    text = verdict([zero, full, close], "qa")
    assert "LoRA r=8 is within the noise of full fine-tuning" in text and "worth it" in text
    assert "0.34% of the trainable parameters" in text and "1/300 of the disk" in text

    behind = _config("lora", 8, [37.5, 37.5], 460_000, 1_800_000)
    assert "full fine-tuning wins by 3.5 points, but LoRA keeps 91%" in verdict([zero, full, behind], "qa")
    unresolved = [_config("full", None, [41.0], 135_000_000, 540_000_000, stderr=3.0),
                  _config("lora", 8, [36.0], 460_000, 1_800_000, stderr=3.0)]
    assert "cannot separate the two" in verdict([zero, *unresolved], "qa")
    far = _config("lora", 8, [10.0, 12.0], 460_000, 1_800_000)
    assert "LoRA reaches only 27%" in verdict([zero, full, far], "qa")
    flat = _config("full", None, [2.5], 135_000_000, 540_000_000)
    assert "cannot tell" in verdict([zero, flat, _config("lora", 4, [2.2], 1, 1)], "qa")


def test_sweep_file_is_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"models": ["gpt2"], "methods": ["full", "prefix"], "eval": {"data": "x"}}))
    with pytest.raises(QatuneError, match="methods"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"models": ["gpt2"], "eval": {"data": "x"}, "epochs": 3}))
    with pytest.raises(QatuneError, match="unknown sweep key"):
        load_sweep(path)
