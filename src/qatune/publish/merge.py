"""`qatune merge RUN OUT`: a LoRA run as a standalone Hugging Face checkpoint, the adapter folded into the base
weights (for tools that do not read peft adapters)."""

from __future__ import annotations

import os
from pathlib import Path

from qatune.errors import ModelError
from qatune.generation.runs import load_for_inference
from qatune.lora.adapters import ADAPTER_CONFIG, save_merged
from qatune.runs.layout import RunDir


def merge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """`qatune merge RUN OUT`: a LoRA run directory (`RUN/config.yaml` naming the base model, `RUN/adapter`)
    -> a standalone Hugging Face checkpoint in OUT, tokenizer included."""
    run = RunDir(run_dir)
    if not (run.adapter / ADAPTER_CONFIG).is_file() or not run.config.is_file():
        raise ModelError(f"{run.path} is not a LoRA run directory: expected config.yaml and adapter/{ADAPTER_CONFIG}")
    model, tokenizer = load_for_inference(run.path)
    return save_merged(model, tokenizer, out_dir)
