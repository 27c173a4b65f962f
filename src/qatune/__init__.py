"""qatune: fine-tune GPT-2-family and other small causal LMs on question-answer data, full or LoRA.

Layers, lowest first (each imports only from those below it; `docs/DESIGN.md`): `utils`; `models`, `data` and
`runs`; `lora`; `generation`; `publish`; `evaluation`; `training`; `compare` and `bench`; `cli`.

The public names below are imported on first use, so that `import qatune.data` (or `import qatune`) does not
import the training stack.
"""

import logging

from qatune.utils.lazy import lazy_exports

# The library logs and never shows: an application (the `qatune` command: cli/logs.py) attaches the handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
_EXPORTS = {
    "ConfigError": "qatune.errors",
    "DataError": "qatune.errors",
    "ModelError": "qatune.errors",
    "QatuneError": "qatune.errors",
    "count_parameters": "qatune.lora.inject",
    "load_config": "qatune.training.config",
    "load_model": "qatune.generation.runs",
    "load_tokenizer": "qatune.models.tokenizer",
    "train_model": "qatune.training.recipe",
}
__all__ = ["ConfigError", "DataError", "ModelError", "QatuneError", "__version__", "count_parameters",
           "load_config", "load_model", "load_tokenizer", "train_model"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
