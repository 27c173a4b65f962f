"""Output: the library logs (`logging`, `qatune.*` loggers, a NullHandler only); the CLI shows the messages on
stderr, one line each, and keeps stdout for results."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from qatune.cli import main
from qatune.runs.layout import RunDir
from qatune.training.config import load_config
from qatune.training.resume_check import check_resume_config


def test_importing_the_library_installs_only_a_null_handler():
    """In a fresh interpreter (pytest has its own handlers on the root logger): importing the package and the
    modules that log adds no handler that shows anything; the application decides."""
    code = ("import logging, qatune, qatune.training.recipe, qatune.compare.run, qatune.bench.runner\n"
            "print([type(h).__name__ for h in logging.getLogger('qatune').handlers], logging.getLogger().handlers,"
            " logging.getLogger('qatune').level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['NullHandler']", "[]", "0"]


def test_library_messages_are_log_records_on_qatune_loggers(tmp_path, caplog, capsys):
    """A resume's applied changes (info) and a torn metrics line (warning) are records of the modules' own
    loggers, and nothing is written to the console by the library itself."""
    cfg = load_config(None, ["model=m", f"out={tmp_path}", "train.lr=0.002"])
    saved = {"config": load_config(None, ["model=m", f"out={tmp_path}", "train.lr=0.001"]).to_dict()}
    run = RunDir(tmp_path)
    run.metrics.write_text('{"event": "train", "step": 1}\n{"event": "tr')
    with caplog.at_level(logging.INFO, logger="qatune"):
        check_resume_config(saved, cfg, 1, tmp_path / "checkpoints" / "step-000001")
        run.repair_metrics(1)
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [("qatune.training.resume_check", logging.INFO, "resume: train.lr 0.001 -> 0.002 (applied)"),
                   ("qatune.runs.layout", logging.WARNING,
                    f"{run.metrics}: dropped 1 incomplete line(s) left by an interrupted write")]
    assert capsys.readouterr() == ("", "")


@pytest.fixture
def train_args(qa_gpt2_dir, tmp_path):
    return ["train", f"model={qa_gpt2_dir}", "method=lora", "data.train=sample", "train.max_steps=1",
            "train.batch_size=4", "train.progress=false", f"out={tmp_path / 'run'}"]


def test_the_cli_shows_each_message_as_one_line_on_stderr(train_args, capsys):
    """Through `main`: the library's messages on stderr, one whole line each, stdout untouched; a second command
    in the same process shows them once (the handler is the command's, removed after it)."""
    for attempt in (train_args, [*train_args, "overwrite=true"]):
        assert main(attempt) == 0
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.splitlines()
        data = [line for line in lines if line.startswith("Data: ")]
        assert len(data) == 1 and " train / " in data[0] and " validation examples; " in data[0]
        out_dir = train_args[-1].removeprefix("out=")  # a long path: a wrapped line would split it
        assert sum(line.startswith("Done: 1 steps, best val loss ") and line.endswith(f"result in {out_dir}")
                   for line in lines) == 1
        assert sum(line.startswith("eval step 1  val_loss ") for line in lines) == 1
    assert [type(h) for h in logging.getLogger("qatune").handlers] == [logging.NullHandler]
    assert logging.getLogger("qatune").level == logging.NOTSET


def test_python_m_qatune_shows_the_messages_too(train_args):
    """`python -m qatune` (what compare launches for each run, and torchrun) goes through the same entry point."""
    res = subprocess.run([sys.executable, "-m", "qatune", *train_args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == ""
    assert sum(line.startswith("Data: ") for line in res.stderr.splitlines()) == 1
