"""`qatune compare` rerun after the sweep changed: no result of old settings is reported under new ones, and
names made from long grid values stay valid file names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from qatune.compare.run import prepare, run_sweep
from qatune.compare.sweep import load_sweep
from qatune.data.readers import DATA_ALIASES
from qatune.errors import ConfigError


def _write_sweep(path: Path, model: Path, source: Path, test: Path, **train) -> None:
    sweep = {
        "name": "rerun", "models": [str(model)], "methods": ["full"], "seeds": [0], "zero_shot": True,
        "slices": {"train": {"source": str(source), "start": 0, "stop": 40}},
        "base": {"data": {"train": "slice:train", "val": str(path.parent / "val.jsonl"), "max_length": 64},
                 "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "progress": False, **train}},
        "eval": {"data": str(test), "generation": {"max_new_tokens": 2}},
    }
    path.write_text(yaml.safe_dump(sweep))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rerun_redoes_changed_evaluations_and_refuses_changed_trainings(qa_gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    sample_test = Path(DATA_ALIASES["sample-test"]).read_text().splitlines(keepends=True)
    source, test, val = tmp_path / "train.jsonl", tmp_path / "test.jsonl", tmp_path / "val.jsonl"
    source.write_text(Path(DATA_ALIASES["sample"]).read_text())
    val.write_text("".join(source.read_text().splitlines(keepends=True)[200:208]))
    test.write_text("".join(sample_test[:6]))
    sweep, out = tmp_path / "sweep.yaml", tmp_path / "out"
    _write_sweep(sweep, qa_gpt2_dir, source, test, lr=1e-3)
    run_sweep(sweep, out)
    full = out / "runs" / f"{qa_gpt2_dir.name}-full-s0"
    trained = (full / "summary.json").stat()

    # same file name, other content; and a key that does not change results (logging): evaluations redone
    test.write_text("".join(sample_test[10:14]))
    _write_sweep(sweep, qa_gpt2_dir, source, test, lr=1e-3, log_every=2)
    run_sweep(sweep, out)
    assert (full / "summary.json").stat().st_mtime_ns == trained.st_mtime_ns, "the training was redone"
    new_answers = [[json.loads(line)["answer"]] for line in sample_test[10:14]]
    results = json.loads((out / "results.json").read_text())
    for row in results["runs"]:
        eval_dir = out / "runs" / row["name"] / "eval"
        assert [r["references"] for r in _rows(eval_dir / "predictions.jsonl")] == new_answers
        assert row["eval"]["examples"] == 4 and len(row["item_scores"]["test"]["f1"]) == 4
        assert row["eval"] == {k: v for k, v in json.loads((eval_dir / "metrics.json").read_text()).items()
                               if k not in ("generation", "template", "source")}
    spec = json.loads((full / "eval" / "spec.json").read_text())  # what the evaluation was made from
    assert spec["data"]["sha256"] == hashlib.sha256(test.read_bytes()).hexdigest()
    report = (out / "report.md").read_text()

    # another learning rate for a trained run: refused, naming the run and the key, nothing written
    _write_sweep(sweep, qa_gpt2_dir, source, test, lr=1e-2)
    with pytest.raises(ConfigError, match=rf"{full.name} \(train\.lr: 0\.001 -> 0\.01\).*another --out"):
        run_sweep(sweep, out)
    assert (out / "report.md").read_text() == report
    assert (full / "summary.json").stat().st_mtime_ns == trained.st_mtime_ns

    # the slice's source file changed under the same name: refused too, and the slice is not rewritten
    slice_file = out / "data" / "train.jsonl"
    trained_on = slice_file.read_text()
    source.write_text("".join(reversed(source.read_text().splitlines(keepends=True))))
    _write_sweep(sweep, qa_gpt2_dir, source, test, lr=1e-3)
    with pytest.raises(ConfigError, match=rf"{full.name} \(data\.train: slice train changed"):
        run_sweep(sweep, out)
    assert slice_file.read_text() == trained_on

    # a training data file edited in place (same name): refused
    source.write_text("".join(reversed(source.read_text().splitlines(keepends=True))))  # as it was
    val.write_text("".join(source.read_text().splitlines(keepends=True)[210:218]))
    with pytest.raises(ConfigError, match=rf"{full.name} \(data\.val: the content of {val} changed"):
        run_sweep(sweep, out)
    assert (out / "report.md").read_text() == report


def _grid_sweep(tmp_path: Path, templates: list[str], **extra) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"models": ["gpt2"], "methods": ["lora"], "ranks": [8], "seeds": [0, 1],
                                    "grid": {"lora": {"data.template": templates}},
                                    "base": {"data": {"train": "sample"}}, "eval": {"data": "sample-test"},
                                    **extra}))
    return path


def test_long_grid_values_make_bounded_distinct_names(tmp_path):
    stem = "Answer the question in as few words as you can. " * 6
    templates = [stem + "Question: {question}\nAnswer:", stem + "Q: {question}\nA:"]
    assert all(len(t) > 300 for t in templates)
    sweep = load_sweep(_grid_sweep(tmp_path, templates))
    out = tmp_path / "out"
    configs = prepare(sweep, out)  # the whole sweep validated; nothing written
    assert not out.exists()
    names = [run.name for run in sweep.every_trainable()]
    assert len(set(names)) == 4 and set(configs) == set(names)
    assert all(len(f".{name}.yaml.tmp-12345678".encode()) < 255 for name in names)
    assert all(name.startswith("gpt2-lora-r8-templateAnswer the question") for name in names)
    assert {name[-3:] for name in names} == {"-s0", "-s1"}  # the seed stays readable
    assert [configs[name]["data"]["template"] for name in names] == [templates[0]] * 2 + [templates[1]] * 2


def test_a_too_long_slice_name_is_refused_before_anything_is_written(tmp_path):
    long_name = "s" * 300
    sweep = load_sweep(_grid_sweep(tmp_path, ["{question}"], slices={long_name: {"source": "sample"}}))
    with pytest.raises(ConfigError, match="slice s{20}.*more than a file system allows"):
        prepare(sweep, tmp_path / "out")
    assert not (tmp_path / "out").exists()
