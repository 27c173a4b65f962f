"""Running `qatune` in the test process, as a user would, and reading what the user sees."""

from __future__ import annotations

from pathlib import Path

from qatune.cli.commands import main


def train_args(model: Path | str, out: Path | str, *extra: str) -> list[str]:
    """`qatune train` on the built-in facts: a LoRA run small enough for a test."""
    return ["train", f"model={model}", "method=lora", "data.train=sample", "data.max_examples=48",
            "train.batch_size=8", "train.progress=false", f"out={out}", *extra]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`qatune ARGV` in this process: (exit status, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The error a user sees: exactly one `qatune: error:` line and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("qatune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
