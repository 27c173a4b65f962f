"""The `qatune` command line (`commands.py`, arguments in `parser.py`), `qatune download` (`download.py`) and the
demo (`demo.py`)."""

from qatune.utils.lazy import lazy_exports

_EXPORTS = {
    "main": "qatune.cli.commands",
}
__all__ = ["main"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
