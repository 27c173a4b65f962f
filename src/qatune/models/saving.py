"""A native model's weights saved as a standalone Hugging Face checkpoint (what `qatune merge` and full
fine-tuning write): `config.json`, `model.safetensors` and the tokenizer's files.
`AutoModelForCausalLM.from_pretrained(out_dir)` loads it without qatune."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from qatune.errors import ModelError
from qatune.models.config import ModelConfig
from qatune.models.weights import native_to_hf
from qatune.utils.io import write_dir_atomically

HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def save_hf_checkpoint(cfg: ModelConfig, state: dict[str, Tensor], tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `state` (a plain `Decoder`'s tensors) under Hugging Face names, with the config it was loaded with.

    A tied LM head is not duplicated, as transformers saves it; the tokenizer's files are written too unless
    `tokenizer` is None. The directory appears whole or not at all (`write_dir_atomically`)."""
    if not cfg.hf_config:
        raise ModelError("the model has no Hugging Face config to save (it was not loaded from a checkpoint)")
    tensors = {}
    for name, t in native_to_hf(state, cfg):
        t = t.detach().cpu()
        # Llama's q/k/v are row views of the fused qkv; safetensors refuses tensors that share memory.
        tensors[name] = t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
    hf = dict(cfg.hf_config)
    hf.setdefault("model_type", cfg.family)
    hf["architectures"] = [HF_ARCHITECTURES[cfg.family]]
    hf["tie_word_embeddings"] = cfg.tie_embeddings
    hf.pop("torch_dtype", None)
    hf["dtype"] = str(tensors[next(iter(tensors))].dtype).removeprefix("torch.")

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_dir_atomically(out_dir, write)
