"""What a finished run leaves: the result (a peft adapter for LoRA, a Hugging Face checkpoint for full
fine-tuning) and `summary.json`."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatune.lora.adapters import save_adapter, save_merged
from qatune.training.hf_backend import save_hf_result
from qatune.utils.io import atomic_write_text


def save_result(model: nn.Module, tokenizer, target: Path, *, method: str, backend: str, base_model: str) -> Path:
    """The result in `target` (`RunDir.result_for(method)`): a peft adapter with the tokenizer (LoRA) or a
    Hugging Face checkpoint (full)."""
    if backend == "hf":
        save_hf_result(model.model, tokenizer, target, method)
    elif method == "lora":
        save_adapter(model, target, base_model_name_or_path=base_model, tokenizer=tokenizer)
    else:
        save_merged(model, tokenizer, target)
    return target


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2))


def peak_memory(device: torch.device) -> int:
    """Peak allocated CUDA memory, or (CPU) the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
