"""qatune: fine-tune GPT-2-family and other small causal LMs on question-answer data, full or LoRA.

Layers, lowest first (each imports only from those below it; `docs/DESIGN.md`): `utils`; `models` and `data`;
`lora`; `generation`; `evaluation`; `training`; `compare` and `bench`; `cli`.
"""

from __future__ import annotations

import os

import torch

from qatune.errors import ConfigError, DataError, ModelError, QatuneError
from qatune.lora import count_parameters, load_adapter
from qatune.models import Decoder, load_tokenizer
from qatune.models import load_model as _load_base_model
from qatune.training import load_config, train_model

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ModelError", "QatuneError", "__version__", "count_parameters",
           "load_config", "load_model", "load_tokenizer", "train_model"]


def load_model(source: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
               dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> Decoder:
    """A native `Decoder` (`forward(input_ids) -> logits [batch, seq, vocab]`), in eval mode.

    `source`: a local Hugging Face directory, a hub id (`gpt2`), a `.gguf` file, or `smollm2-135m`.
    `adapter`: a LoRA adapter directory in peft's format (saved by qatune or by peft), applied on top.
    `dtype`: e.g. `torch.bfloat16` or "bf16"; default float32. `device`: default "cpu"."""
    model = _load_base_model(source, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(model, adapter)
    return model
