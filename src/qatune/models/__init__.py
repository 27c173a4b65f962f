"""The native decoder and everything needed to get one: configs, weights, loading (dirs, hub, GGUF), tokenizers.

`decoder.py` is the model (the reference path), `fast_ops.py` its faster kernels, `weights.py` the Hugging
Face name and layout tables, `loading.py` `load_base_model` (and where an installed SmolLM2 GGUF is), `gguf_reader.py`
GGUF files, `tokenizer.py` `load_tokenizer`, `saving.py` a standalone Hugging Face checkpoint.
"""

from qatune.models.config import ModelConfig, from_hf_config
from qatune.models.decoder import Decoder, KVCache
from qatune.models.loading import load_base_model, parse_dtype, resolve_source
from qatune.models.tokenizer import load_tokenizer

__all__ = ["Decoder", "KVCache", "ModelConfig", "from_hf_config", "load_base_model", "load_tokenizer", "parse_dtype",
           "resolve_source"]
