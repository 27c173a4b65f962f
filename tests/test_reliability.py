"""Reliability: what a careful user and an attacker would try, one test per guarantee (README, "Reliability").

Runs train a tiny random GPT-2 (`qa_gpt2_dir`) on 48 of the shipped QA facts, in this process through the CLI's
`main` (exit status and the one-line error, as a user sees them), or in forked children that are killed with
SIGKILL at every write point of a checkpoint (`QATUNE_FAULT_AT`, `qatune.utils.faults`).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from cli_run import one_error_line as _one_error_line
from cli_run import run_cli as _run
from cli_run import train_args as _train_args
from safetensors.torch import load_file

from qatune import QatuneError, load_tokenizer
from qatune.cli.commands import main
from qatune.runs.layout import lock_directory
from qatune.training.checkpoint import find_resumable, load_checkpoint, step_dirs, verify
from qatune.training.config import load_config
from qatune.training.recipe import train_model
from qatune.utils.faults import FAULT_ENV


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """Console messages on one line each (rich wraps at the terminal width), so that tests can read them."""
    monkeypatch.setenv("COLUMNS", "1000")


def _snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and link (target) under `root`, the lock file aside."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            path = Path(folder) / name
            if name == ".lock":
                continue
            found[str(path.relative_to(root))] = (f"-> {os.readlink(path)}" if path.is_symlink()
                                                  else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without its timings (the only thing two identical runs may differ in)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if r["event"] == "train"}


def _finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


# ------------------------------------------------------------------------------------------------- security


class _Payload:
    """What an attacker would plant: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_crafted_checkpoint_cannot_run_code(qa_gpt2_dir, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    args = _train_args(qa_gpt2_dir, run, "train.save_every=1", "train.keep_checkpoints=5")
    assert _run(capsys, *args, "train.max_steps=3")[0] == 0
    newest = run / "checkpoints" / "step-000003"
    payload = {"optimizer": _Payload(f"touch {marker}"), "train_state": {}}
    torch.save(payload, newest / "state.pt")  # beside the real state: never read
    older = run / "checkpoints" / "step-000002"
    for f in older.iterdir():  # and a checkpoint in the old format (state.pt only, a pickle)
        f.unlink()
    shutil.copy(newest / "weights.safetensors", older)
    torch.save(payload, older / "state.pt")
    (run / "checkpoints" / "last").unlink()
    os.symlink("step-000002", run / "checkpoints" / "last")

    try:
        code, err = _run(capsys, *args, "train.max_steps=4", "resume=true")
    finally:
        assert not marker.exists(), "a checkpoint ran code"
    assert code == 0, err
    assert f"Resumed from {newest}" in err
    assert "not loaded because unpickling can run code" in verify(older)
    with pytest.raises(QatuneError, match="cannot be used"):
        load_checkpoint(older)


def test_compare_writes_only_inside_out(qa_gpt2_dir, tmp_path, capsys):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("precious\n")
    out = tmp_path / "sweeps" / "out"
    bad_names = [
        {"slices": {str(tmp_path / "victim"): {"source": "sample", "stop": 10}}},  # an absolute path
        {"slices": {"../../escaped": {"source": "sample", "stop": 10}}},  # out/data/../../escaped.jsonl
        {"grid": {"full": {"data.template": ["../../../escaped/{question} {answer}"]}}},  # a run name with '/'
    ]
    for bad in bad_names:
        sweep = {"name": "s", "models": [str(qa_gpt2_dir)], "methods": ["full"], "seeds": [0],
                 "base": {"data": {"train": "sample"}, "train": {"max_steps": 1, "lrr": 1}},  # and a typo
                 "eval": {"data": "sample-test"}, **bad}
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep))
        code, err = _run(capsys, "compare", str(path), "--out", str(out))
        assert code == 2, err
        _one_error_line(err)
        assert victim.read_text() == "precious\n"
        assert not (tmp_path / "sweeps" / "escaped.jsonl").exists() and not (tmp_path / "escaped").exists()
        assert not out.exists(), "a sweep that fails validation must write nothing"


# --------------------------------------------------------------------------------- nothing silently wrong


@pytest.mark.parametrize(("method", "precision"), [("lora", "fp32"), ("lora", "bf16"), ("full", "fp32"),
                                                   ("full", "bf16")])
def test_divergence_stops_the_run_and_never_becomes_the_result(qa_gpt2_dir, tmp_path, capsys, method, precision):
    run = tmp_path / "run"
    code, err = _run(capsys, *_train_args(qa_gpt2_dir, run, f"method={method}", f"train.precision={precision}",
                                          "train.lr=1e4", "train.max_steps=12", "train.save_every=1",
                                          "train.eval_every=2"))
    assert code == 2
    line = _one_error_line(err)
    assert "training diverged at step" in line and "resume=true" in line, line
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    assert f"checkpoints/step-{step - 1:06d}" in line or (step == 1 and "no checkpoint was written" in line), line
    assert not (run / "adapter").exists() and not (run / "model").exists() and not (run / "summary.json").exists()
    for ckpt in step_dirs(run / "checkpoints"):
        weights, state = load_checkpoint(ckpt)
        assert _finite(weights) and step_of_state(state) < step
    best = run / "checkpoints" / "best"
    if best.is_symlink():
        evals = {r["step"]: r for r in _records(run) if r["event"] == "eval"}
        assert evals[step_of_state(load_checkpoint(best)[1])]["val_loss"] < float("inf")


def step_of_state(state: dict) -> int:
    return state["train_state"]["step"]


def test_resume_removes_the_temporary_copies_of_interrupted_writes(qa_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    base = _train_args(qa_gpt2_dir, run, "train.save_every=2")
    assert _run(capsys, *base, "train.max_steps=2")[0] == 0
    (run / ".adapter.tmp-k3x_9q2z").mkdir()  # what a kill during the result write leaves (utils.io's names)
    (run / ".adapter.tmp-k3x_9q2z" / "adapter_model.safetensors").write_bytes(b"half")
    (run / ".summary.json.tmp-a1b2c3d4").write_text("{")
    (run / ".my-notes.tmp-keep").write_text("not ours")  # not a name our writers make: kept
    code, err = _run(capsys, *base, "train.max_steps=4", "resume=true")
    said = "".join(err.split())  # the console wraps long paths
    assert code == 0 and "Removed" in said and ".adapter.tmp-k3x_9q2z" in said and ".summary.json.tmp-a1b2c3d4" in said
    assert sorted(p.name for p in run.glob(".*tmp*")) == [".my-notes.tmp-keep"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_resume_checks_the_config(qa_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    base = _train_args(qa_gpt2_dir, run, "train.save_every=2", "train.schedule=constant", "train.lr=1e-3")
    assert _run(capsys, *base, "train.max_steps=4")[0] == 0
    before = _snapshot(run)
    other = tmp_path / "other.jsonl"
    other.write_text('{"question": "a?", "answer": "b"}\n' * 20)

    code, err = _run(capsys, *base, f"data.train={other}", "lora.r=4", "train.max_steps=6", "resume=true")
    assert code == 2
    line = _one_error_line(err)
    assert f"data.train: 'sample' -> '{other}'" in line and "lora.r: 8 -> 4" in line, line
    assert _snapshot(run) == before

    code, err = _run(capsys, *base, "lora.r=4", "resume=true")  # once a size-mismatch traceback
    assert code == 2 and "lora.r: 8 -> 4" in _one_error_line(err)
    assert _snapshot(run) == before

    code, err = _run(capsys, *base, "train.max_steps=6", "train.lr=2e-3", "resume=true")
    assert code == 0, err
    assert "resume: train.lr 0.001 -> 0.002 (applied)" in err and "resume: train.max_steps 4 -> 6 (applied)" in err
    lrs = {r["step"]: r["lr"] for r in _records(run) if r["event"] == "train"}
    assert [lrs[s] for s in range(1, 7)] == [1e-3] * 4 + [2e-3] * 2  # the new rate really applies
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 2e-3


def test_a_failed_command_leaves_the_run_directory_as_it_was(qa_gpt2_dir, tiny_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = _train_args(qa_gpt2_dir, run, "train.save_every=2", "train.max_steps=4")
    assert _run(capsys, *args)[0] == 0
    before = _snapshot(run)
    attempts = [
        [*args],  # a fresh run would replace this one
        [*args, "data.train=typo.jsonl", "resume=true"],
        [*args, f"model={tiny_gpt2_dir}", "resume=true"],  # another base model
        [*args, "resume=true", "overwrite=true"],
    ]
    for attempt in attempts:
        code, err = _run(capsys, *attempt)
        assert code == 2, (attempt, err)
        _one_error_line(err)
        assert _snapshot(run) == before, attempt
    assert "already holds a run" in _run(capsys, *args)[1]

    code, err = _run(capsys, *args, "train.max_steps=2", "overwrite=true")  # asked for: a new run replaces it
    assert code == 0, err
    assert [r["step"] for r in _records(run) if r["event"] == "train"] == [1, 2]
    assert [p.name for p in step_dirs(run / "checkpoints")] == ["step-000002"]


def test_one_writer_per_run_directory(qa_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "qatune", *_train_args(qa_gpt2_dir, run, "train.max_steps=100000",
                                                         "train.epochs=100000", "train.eval_every=100000")]
    first = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").is_file():  # written once the first run holds the lock
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        code, err = _run(capsys, *_train_args(qa_gpt2_dir, run, "train.max_steps=2", "resume=true"))
        assert code == 2 and f"another qatune process (PID {first.pid})" in _one_error_line(err), err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The holder died without cleaning up: its lock died with it.
    assert (run / ".lock").read_text().strip() == str(first.pid)
    code, err = _run(capsys, *_train_args(qa_gpt2_dir, run, "train.max_steps=2", "resume=true"))
    assert code == 0, err

    out = tmp_path / "compare"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"models": [str(qa_gpt2_dir)], "methods": ["full"], "eval": {"data": "x"},
                                     "base": {"data": {"train": "sample"}}}))
    with lock_directory(out, "comparison directory"):  # another sweep writing there
        code, err = _run(capsys, "compare", str(sweep), "--out", str(out))
        assert code == 2 and f"PID {os.getpid()}" in _one_error_line(err)


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["weights", "state", "dangling-last", "torn-metrics"])
def test_a_damaged_newest_checkpoint_falls_back(qa_gpt2_dir, tmp_path, capsys, damage):
    common = _train_args(qa_gpt2_dir, tmp_path / "x", "train.save_every=1", "train.keep_checkpoints=3",
                         "train.schedule=constant", "train.eval_every=100", "lora.dropout=0.1")
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert _run(capsys, *common, f"out={reference}", "train.max_steps=6")[0] == 0
    assert _run(capsys, *common, f"out={run}", "train.max_steps=4")[0] == 0
    checkpoints = run / "checkpoints"
    if damage == "weights":
        _corrupt(checkpoints / "step-000004" / "weights.safetensors")
    elif damage == "state":
        _corrupt(checkpoints / "step-000004" / "state.safetensors")
    elif damage == "dangling-last":
        (checkpoints / "last").unlink()
        os.symlink("step-000099", checkpoints / "last")
    else:
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"event": "train", "step": 5, "lo')

    code, err = _run(capsys, *common, f"out={run}", "train.max_steps=6", "resume=true")
    assert code == 0, err
    resumed_from = "step-000003" if damage in ("weights", "state") else "step-000004"
    assert f"Resumed from {checkpoints / resumed_from}" in err
    if damage in ("weights", "state"):
        assert "Skipping damaged checkpoint step-000004" in err
    # Continued, not restarted: the steps before the resume are still in metrics.jsonl (each line valid JSON,
    # the torn one dropped), and every loss is the uninterrupted run's, bit for bit.
    assert _losses(run) == _losses(reference)
    final = load_file(checkpoints / "step-000006" / "weights.safetensors")
    expected = load_file(reference / "checkpoints" / "step-000006" / "weights.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert os.readlink(checkpoints / "last") == "step-000006"


def test_resume_refuses_when_no_checkpoint_is_intact(qa_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = _train_args(qa_gpt2_dir, run, "train.save_every=1", "train.max_steps=2")
    assert _run(capsys, *args)[0] == 0
    for ckpt in step_dirs(run / "checkpoints"):
        _corrupt(ckpt / "weights.safetensors")
    before = _snapshot(run)
    code, err = _run(capsys, *args, "resume=true")
    assert code == 2 and "no checkpoint" in _one_error_line(err) and "is intact" in err
    assert _snapshot(run) == before  # neither checkpoints nor metrics deleted


def _disk_full_after(written: bytes, path: Path) -> OSError:
    path.write_bytes(written)  # what a full disk leaves: the start of the file
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_leaves_the_previous_result_and_checkpoint_intact(qa_gpt2_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = _train_args(qa_gpt2_dir, run, "train.save_every=1")
    assert _run(capsys, *args, "train.max_steps=2")[0] == 0
    result = _snapshot(run / "adapter")

    def save_tokenizer(self, directory, *a, **k):  # as the tokenizers library fails: a plain Exception
        (Path(directory) / "tokenizer.json").write_bytes(b'{"version": "1.0", "trunc')
        raise Exception("No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(type(load_tokenizer(qa_gpt2_dir)), "save_pretrained", save_tokenizer)
        code, err = _run(capsys, *args, "train.max_steps=3", "resume=true")
    assert code == 2
    line = _one_error_line(err)
    assert f"cannot write {run / 'adapter'}" in line and "no space left on device" in line, line
    assert _snapshot(run / "adapter") == result, "the previous result must stay intact"
    assert _run(capsys, "ask", str(run), "What is the capital of France?", "--max-new-tokens", "2")[0] == 0

    import qatune.training.checkpoint as checkpoint_module

    real_save = checkpoint_module.save_file

    def save_weights(tensors, filename, *a, **k):
        if "step-000005" in filename:
            raise _disk_full_after(b"\x00" * 10, Path(filename))
        return real_save(tensors, filename, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "save_file", save_weights)
        code, err = _run(capsys, *args, "train.max_steps=6", "resume=true")
    assert code == 2 and "no space left on device" in _one_error_line(err) and "step-000005" in err
    newest, skipped = find_resumable(run / "checkpoints")
    assert newest.name == "step-000004" and not skipped  # intact, and nothing half-written left as a checkpoint
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert _run(capsys, *args, "train.max_steps=6", "resume=true")[0] == 0


# ----------------------------------------------------------------------------------- bad input, one line


def _tiny_gguf(path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_input_is_one_line_and_exit_2(qa_gpt2_dir, tmp_path, capsys):
    def refused(*argv: str) -> str:
        code, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        return _one_error_line(err)

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "a?", "answer": "b"}\n{"question": "caf\xe9?", "answer": "c"}\n'
                    + b'{"question": "d?", "answer": "e"}\n' * 20)
    assert f"{bad}:2: invalid encoding" in refused(*_train_args(qa_gpt2_dir, tmp_path / "a", f"data.train={bad}"))
    code, err = _run(capsys, *_train_args(qa_gpt2_dir, tmp_path / "b", f"data.train={bad}", "data.skip_invalid=true",
                                          "train.max_steps=1"))
    assert code == 0, err
    assert len(json.loads((tmp_path / "b" / "summary.json").read_text())["data"]["skipped"]) == 1

    line = refused(*_train_args(qa_gpt2_dir, tmp_path / "c", "data.max_length=512"))
    assert "data.max_length=512" in line and "128" in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is an existing file" in refused(*_train_args(qa_gpt2_dir, afile))
    gguf = tmp_path / "model.gguf"
    _tiny_gguf(gguf)
    gguf.write_bytes(gguf.read_bytes()[:-100])
    assert "truncated" in refused(*_train_args(gguf, tmp_path / "d"))

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"models": [str(qa_gpt2_dir)], "ranks": [4, "eight"], "eval": {"data": "x"}}))
    assert "ranks" in refused("compare", str(sweep), "--out", str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1e-3\n  epochs: 2\n")
    assert refused("train", str(broken)).startswith(f"qatune: error: {broken}:3:")
    assert refused("compare", str(broken)).startswith(f"qatune: error: {broken}:3:")

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"model": str(qa_gpt2_dir), "data": {}}))
    assert "without a result" in refused("eval", str(unfinished), "--data", "sample-test")
    assert "question is empty" in refused("ask", str(qa_gpt2_dir), "  ")


@pytest.mark.parametrize(("argv", "expected"), [
    (["eval", "run", "--data", "sample-test", "--max-examples", "-1"], "argument --max-examples: must be >= 1, got -1"),
    (["eval", "run", "--data", "sample-test", "--max-examples", "0"], "argument --max-examples: must be >= 1, got 0"),
    (["eval", "run", "--data", "sample-test", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["eval", "run", "--data", "sample-test", "--few-shot", "-1"], "argument --few-shot: must be >= 0, got -1"),
    (["eval", "run", "--data", "sample-test", "--few-shot", "two"],
     "argument --few-shot: expected an integer >= 0, got 'two'"),
    (["bench", "--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    (["bench", "--n-layer", "0"], "argument --n-layer: must be >= 1, got 0"),
    (["demo", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
])
def test_counts_out_of_range_are_refused_by_the_parser(capsys, argv, expected):
    """`--max-examples -1` used to be a Python slice (59 of 60 examples scored), `--batch-size 0` and
    `--few-shot -1` tracebacks: argparse refuses them, before anything runs."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"qatune {argv[0]}: error: {expected}"


@pytest.mark.parametrize(("option", "value"), [("--max-new-tokens", "-1"), ("--num-beams", "0"), ("--top-k", "-1"),
                                               ("--no-repeat-ngram-size", "-1")])
def test_generation_counts_out_of_range_are_one_line(tmp_path, capsys, option, value):
    """The other integer options of eval/ask are checked by `GenerationConfig` (bench's by `BenchConfig`): one
    line, exit 2, before a model is loaded."""
    code, err = _run(capsys, "eval", str(tmp_path / "no-model"), "--data", "sample-test", "--out", str(tmp_path),
                     option, value)
    assert code == 2 and "invalid generation config" in _one_error_line(err)
    code, err = _run(capsys, "bench", "--steps", "0")
    assert code == 2 and "must be >= 1" in _one_error_line(err)


def test_data_that_is_not_a_file_is_one_line(qa_gpt2_dir, tmp_path, capsys):
    """A typo without extension used to be sent to the Hugging Face Hub (a ConnectionError traceback after 24 s
    of retries offline); a device and a directory of no data files, tracebacks."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, expected in [(tmp_path / "trian", "data file not found"), ("/dev/zero", "not a regular file"),
                           (empty, "could not be loaded with datasets" if importlib.util.find_spec("datasets")
                            else "needs the 'datasets' package")]:
        if str(data) == "/dev/zero" and not Path(data).exists():
            continue
        code, err = _run(capsys, *_train_args(qa_gpt2_dir, tmp_path / "run", f"data.train={data}"))
        assert code == 2 and expected in _one_error_line(err) and str(data) in err, err
        code, err = _run(capsys, "eval", str(qa_gpt2_dir), "--data", str(data), "--out", str(tmp_path / "ev"))
        assert code == 2 and expected in _one_error_line(err), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ev").exists()


# ------------------------------------------------------------------------------------- fault injection

# Sessions of one run, each resumed from what the previous one left and killed with SIGKILL the N-th time it
# passes a write point (LABEL:N, `qatune.utils.faults`). The run: 12 steps (2 epochs of 6), a checkpoint at every
# step, evaluations at 3, 6, 9 and 12. Step reached by each session, in order: 0 (killed inside the first
# checkpoint, after its weights, its state tensors, its state.json, its manifest), 1 (renamed into place, `last`
# not yet moved), 2 (`last` moved, before rotation), 3 (evaluation: `best` moved, before rotation), 4 (after
# rotation), 4 (while config.yaml is written), 4 (while metrics.jsonl is cut back), 6 (evaluation at the epoch's
# end: between the `last` and `best` swaps), 7 (the next checkpoint's weights), 9 (its manifest), 11 (after
# rotation), 12 (the last checkpoint renamed in, neither link moved), then in the finished run: while the result
# directory is written, while summary.json is written (a resumed session's 4th atomic file: config.yaml,
# metrics.jsonl cut back by the resume and by the log, summary.json), and while the result replaces the previous
# one file by file. A last session without a fault finishes the run.
FAULTS = ["weights-written:1", "tensors-written:1", "state-written:1", "manifest-written:1", "renamed:1",
          "last-linked:1", "best-linked:1", "rotated:1", "atomic-file:1", "atomic-file:2", "last-linked:2",
          "weights-written:2", "manifest-written:3", "rotated:2", "renamed:1", "dir-written:1", "atomic-file:4",
          "dir-file-replaced:1"]


def _fault_driver(spec: dict) -> None:
    """In a fresh process (so that no test's threads are forked): import once, then train each session in a
    forked child that a fault point may kill. Prints the exit status of every session as JSON."""
    torch.set_num_threads(1)
    logs = Path(spec["logs"])
    logs.mkdir(parents=True, exist_ok=True)

    def session(i: int, out: str, fault: str | None) -> int:
        pid = os.fork()
        if pid == 0:
            log = os.open(logs / f"session-{i:02d}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            if fault:
                os.environ[FAULT_ENV] = fault
            code = 0
            try:
                train_model(load_config(None, spec["overrides"] + [f"out={out}", "resume=true"]))
            except BaseException:  # noqa: BLE001 -- a forked child must end in os._exit, whatever happened
                traceback.print_exc()
                code = 3
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    codes = [session(0, spec["reference"], None)]
    codes += [session(i, spec["run"], fault) for i, fault in enumerate(spec["faults"], start=1)]
    codes.append(session(len(spec["faults"]) + 1, spec["run"], None))
    print(json.dumps(codes))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sigkill_at_every_write_point_then_resume_is_exact(qa_gpt2_dir, tmp_path, method):
    overrides = [f"model={qa_gpt2_dir}", f"method={method}", "data.train=sample", "data.max_examples=24",
                 "train.batch_size=4", "train.epochs=2", "train.save_every=1", "train.eval_every=3",
                 "train.lr=1e-3", "lora.dropout=0.1", "train.progress=false"]
    spec = {"overrides": overrides, "faults": FAULTS, "reference": str(tmp_path / "reference"),
            "run": str(tmp_path / "run"), "logs": str(tmp_path / "logs")}
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop(FAULT_ENV, None)
    done = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    logs = {p.name: p.read_text()[-1500:] for p in sorted((tmp_path / "logs").iterdir())}
    assert codes[0] == 0 and codes[-1] == 0, logs
    # every session died where it was told to: a fault point that was never reached would test nothing
    assert codes[1:-1] == [-signal.SIGKILL] * len(FAULTS), (codes, logs)

    reference, run = tmp_path / "reference", tmp_path / "run"
    assert _records(run) == _records(reference)  # every loss, learning rate and evaluation, bit for bit
    result = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    ours, theirs = load_file(run / result), load_file(reference / result)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    last = load_file(run / "checkpoints" / "last" / "weights.safetensors")
    expected = load_file(reference / "checkpoints" / "last" / "weights.safetensors")
    assert all(torch.equal(last[k], expected[k]) for k in expected)
    assert os.readlink(run / "checkpoints" / "best") == os.readlink(reference / "checkpoints" / "best")
    summary, expected_summary = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    for key in ("steps", "epochs_completed", "best_step", "best_val_loss", "best_metric", "early_stopped"):
        assert summary[key] == expected_summary[key], key


if __name__ == "__main__":  # the fault-injection driver (see _fault_driver)
    _fault_driver(json.loads(sys.argv[1]))
