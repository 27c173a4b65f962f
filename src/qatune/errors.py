"""The exceptions qatune raises for problems a user can fix; the CLI prints their message in one line and exits 2.

Each names where the problem is (a file and line, a config key, a tensor), so that the message alone says what
to change. They also derive from `ValueError`, which is what a Python caller of the library would catch for a bad
argument. Programming errors inside qatune stay ordinary exceptions with tracebacks.
"""


class QatuneError(Exception):
    """A problem the user can fix; the CLI prints its message without a traceback."""


class ConfigError(QatuneError, ValueError):
    """A bad configuration value or key, a bad sweep file, a bad command-line argument."""


class DataError(QatuneError, ValueError):
    """Bad input data; the message starts with the location ("path:line") so the user can fix the file."""


class ModelError(QatuneError, ValueError):
    """A model, checkpoint, adapter or tokenizer that cannot be found, read or used."""


class StorageError(QatuneError, OSError):
    """A file that could not be written (disk full, permissions); the message names the path. Whatever was in
    place before (the previous checkpoint, the previous result) is left intact."""


class TrainingError(QatuneError):
    """Training cannot go on as configured: a non-finite loss or gradient (divergence), a run directory in use."""
