"""qatune: fine-tune GPT-2-family and other small causal LMs on question-answer data, full or LoRA.

Layers, lowest first (each imports only from those below it; `docs/DESIGN.md`): `utils`; `models` and `data`;
`lora`; `generation`; `evaluation`; `training`; `compare` and `bench`; `cli`.
"""

from __future__ import annotations

from qatune.errors import ConfigError, DataError, ModelError, QatuneError
from qatune.generation.runs import load_model
from qatune.lora import count_parameters
from qatune.models import load_tokenizer
from qatune.training import load_config, train_model

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ModelError", "QatuneError", "__version__", "count_parameters",
           "load_config", "load_model", "load_tokenizer", "train_model"]
