"""The run directory's layout (`qatune.runs.layout`): where the result is, what makes a directory a run, what
overwrite=true removes, how metrics.jsonl is cut back on resume; and that no other module spells a run's names."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from qatune.errors import ConfigError, TrainingError
from qatune.runs.layout import CARD, LOCK, EvalDir, RunDir, lock_directory

SRC = Path(__file__).resolve().parents[1] / "src" / "qatune"
OWNER = SRC / "runs" / "layout.py"
# Names that mean a run's file wherever they appear as a string.
FILE_NAMES = ("config.yaml", "summary.json", "metrics.jsonl", "metrics.json", "predictions.jsonl", "trackers.json",
              "checkpoints", "mlruns", ".lock", "README.md")
# Names that are also config keys, commands or tracker names: a run's folder only when joined into a path.
FOLDER_NAMES = ("adapter", "model", "eval", "tensorboard")


def _joined(tree: ast.AST) -> set[int]:
    """ids of the string constants used as a path part: an operand of `/`, or listed beside another run name
    (`for name in ("adapter", "model")`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found |= {id(side) for side in (node.left, node.right) if isinstance(side, ast.Constant)}
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e for e in node.elts if isinstance(e, ast.Constant) and e.value in FILE_NAMES + FOLDER_NAMES]
            found |= {id(e) for e in names} if len(names) > 1 else set()
    return found


def _spellings(path: Path) -> list[str]:
    """`line: 'name'` for each string of `path` that spells a run's file or folder name."""
    tree = ast.parse(path.read_text())
    joined = _joined(tree)
    return [f"{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (node.value in FILE_NAMES or node.value.startswith("eval-")
                 or (node.value in FOLDER_NAMES and id(node) in joined))]


def test_only_the_layout_spells_the_names_of_a_run():
    hits = [f"{path.relative_to(SRC)}:{hit}" for path in sorted(SRC.rglob("*.py")) if path != OWNER
            for hit in _spellings(path)]
    assert hits == []


def test_a_checkpoint_folder_is_the_checkpoint_format_s():
    """What a checkpoint folder holds is spelled by training/checkpoint.py alone."""
    names = ("weights.safetensors", "state.safetensors", "state.json", "manifest.json")
    owner = SRC / "training" / "checkpoint.py"
    hits = [f"{path.relative_to(SRC)}:{node.lineno}" for path in sorted(SRC.rglob("*.py")) if path != owner
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant) and node.value in names]
    assert hits == []


def test_the_scan_finds_a_name_spelled_elsewhere(tmp_path):
    """The check above can fail: a module joining a run's names itself is caught, a config key is not."""
    module = tmp_path / "m.py"
    module.write_text('def f(out, cfg):\n    return out / "model", out / "summary.json", cfg.get("model"), '
                      'out / f"eval-{cfg}", [n for n in ("adapter", "model")], {"eval": 1}\n')
    found = sorted(hit.split(": ", 1)[1] for hit in _spellings(module))
    assert found == ["'adapter'", "'eval-'", "'model'", "'model'", "'summary.json'"]


def test_the_result_is_the_adapter_for_lora_and_the_model_otherwise(tmp_path):
    run = RunDir(tmp_path)
    assert run.result_for("lora") == tmp_path / "adapter"
    assert run.result_for("full") == tmp_path / "model"
    assert run.result is None and run.card is None  # not finished yet
    (tmp_path / "model").mkdir()
    assert run.result == tmp_path / "model"
    assert run.card == tmp_path / "model" / "README.md"
    (tmp_path / "adapter").mkdir()
    assert run.result == tmp_path / "adapter"


def test_a_run_is_recognised_by_its_config(tmp_path):
    """A run is a folder whose config.yaml is a qatune run config; a folder that merely holds a run's names is
    none (overwrite=true must not empty it), and a run would not write over them either (`check_target`)."""
    assert not RunDir(tmp_path / "absent").holds_run()
    assert not RunDir(tmp_path).holds_run()  # an empty directory
    (tmp_path / "notes.txt").write_text("mine")
    assert not RunDir(tmp_path).holds_run()
    run_config = "model: gpt2\nmethod: lora\ndata: {train: sample}\ntrain: {lr: 0.001}\n"
    for name, text, is_run in [("run", run_config, True), ("empty", "", False), ("other", "learning: rate\n", False),
                               ("partial", "model: gpt2\nmethod: lora\n", False), ("bad", "a: [", False),
                               ("typed", run_config.replace("model: gpt2", "model: [gpt2]"), False)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(text)
        assert RunDir(tmp_path / name).holds_run() is is_run, name
    for marker in ("metrics.jsonl", "summary.json"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("")
        assert not RunDir(folder).holds_run()
        with pytest.raises(ConfigError, match=f"holds {marker} but no qatune run"):
            RunDir(folder).check_target(replace=False)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoints").symlink_to(tmp_path / "nowhere")  # a dangling link is named too
    with pytest.raises(ConfigError, match="holds checkpoints but no qatune run"):
        RunDir(tmp_path / "ck").check_target(replace=False)
    with pytest.raises(ConfigError, match="overwrite=true replaces a qatune run.*holds checkpoints: nothing"):
        RunDir(tmp_path / "ck").check_target(replace=True)
    RunDir(tmp_path / "run").check_target(replace=True)  # a run may be replaced
    RunDir(tmp_path / "absent").check_target(replace=True)


def test_clear_removes_the_previous_run_and_nothing_else(tmp_path):
    run = RunDir(tmp_path)
    for folder in (run.checkpoints / "step-000001", run.adapter, run.model, run.eval.path, run.tensorboard):
        folder.mkdir(parents=True)
        (folder / "f").write_text("x")
    for file in (run.metrics, run.summary, run.trackers, run.config):
        file.write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "eval-extra").mkdir()
    lock = run.lock()
    try:
        run.clear()
    finally:
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "config.yaml", "eval-extra", "notes.txt"]
    run.clear()  # nothing left to clear: no error


def test_interrupted_writes_are_removed(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / ".adapter.tmp-abc12345").mkdir()
    (tmp_path / ".summary.json.tmp-xyz_6789").write_text("{")
    (tmp_path / "summary.json").write_text("{}")
    assert run.remove_interrupted_writes() == [".adapter.tmp-abc12345", ".summary.json.tmp-xyz_6789"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert RunDir(tmp_path / "absent").remove_interrupted_writes() == []


def _records(n: int) -> str:
    return "".join(json.dumps({"event": "train", "step": i}) + "\n" for i in range(1, n + 1))


def test_metrics_are_cut_back_to_the_records_a_checkpoint_counted(tmp_path, caplog):
    run = RunDir(tmp_path)
    assert run.count_metrics_records() == 0
    run.metrics.write_text(_records(3))
    assert run.count_metrics_records() == 3
    checkpointed = run.count_metrics_records()
    with open(run.metrics, "a") as f:
        f.write(_records(5)[len(_records(3)):])  # steps 4 and 5, logged after the checkpoint
    with caplog.at_level(logging.INFO, logger="qatune"):
        run.repair_metrics(checkpointed)
    assert run.metrics.read_text() == _records(3)
    assert caplog.records == []


def test_a_torn_last_line_is_dropped_and_said(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.metrics.write_text(_records(2) + '{"event": "train", "st')  # a kill mid-write
    assert run.count_metrics_records() == 2  # the torn line has no newline: not a record
    with caplog.at_level(logging.INFO, logger="qatune"):
        run.repair_metrics(2)
    assert run.metrics.read_text() == _records(2)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "dropped 1 incomplete line" in said[0]


def test_a_torn_line_in_the_middle_does_not_count(tmp_path, caplog):
    """A torn line followed by later records (a resume after a crash that was itself resumed): the torn line is
    dropped and the count still keeps `records` whole records."""
    run = RunDir(tmp_path)
    run.metrics.write_bytes(_records(1).encode() + b'{"event": "tr\xff\n' + _records(3)[len(_records(1)):].encode())
    with caplog.at_level(logging.INFO, logger="qatune"):
        run.repair_metrics(2)
    assert run.metrics.read_text() == _records(2)
    assert caplog.records


def test_a_fresh_start_cuts_nothing(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.metrics.write_text(_records(2))
    with caplog.at_level(logging.INFO, logger="qatune"):
        run.repair_metrics(None)
        assert run.metrics.read_text() == _records(2)
        RunDir(tmp_path / "absent").repair_metrics(0)  # no file: nothing to do
    assert caplog.records == []


def test_the_config_is_read_as_plain_yaml(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_config() is None
    run.config.write_text("model: gpt2\nunknown_key: 1\n")
    assert run.read_config() == {"model": "gpt2", "unknown_key": 1}
    run.config.write_text("")
    assert run.read_config() == {}


def test_an_evaluation_writes_its_metrics_last(tmp_path):
    ev = EvalDir(tmp_path / "eval")
    assert not ev.done()
    ev.write({"em": 50.0}, [{"prediction": "Paris"}, {"prediction": "é"}])
    assert ev.done()
    assert json.loads(ev.metrics.read_text()) == {"em": 50.0}
    assert [json.loads(line) for line in ev.predictions.read_text().splitlines()] == [{"prediction": "Paris"},
                                                                                      {"prediction": "é"}]
    assert RunDir(tmp_path).eval == ev
    assert RunDir(tmp_path).eval_named("mc-arc").path == tmp_path / "eval-mc-arc"


def test_one_writer_per_directory(tmp_path):
    assert (LOCK, CARD) == (".lock", "README.md")  # the names the README documents
    with lock_directory(tmp_path / "sweep", "comparison directory"):
        assert (tmp_path / "sweep" / LOCK).is_file()
        with pytest.raises(TrainingError, match="in use"):
            RunDir(tmp_path / "sweep").lock()
