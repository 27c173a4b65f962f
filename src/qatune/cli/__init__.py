"""The `qatune` command line (`commands.py`, arguments in `parser.py`), `qatune download` (`download.py`) and the
demo (`demo.py`)."""

from qatune.cli.commands import main

__all__ = ["main"]
