"""A model or a qatune run directory, loaded for use: answering, evaluating, merging, exporting.

A run directory is what `qatune train` writes: `config.yaml` naming the base model, and the result in
`adapter/` (LoRA, peft format) or `model/` (full fine-tuning, a Hugging Face checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qatune.errors import ModelError
from qatune.lora.adapters import ADAPTER_CONFIG, load_adapter
from qatune.models.decoder import Decoder
from qatune.models.loading import ALIASES, load_base_model
from qatune.models.tokenizer import has_tokenizer, load_tokenizer
from qatune.runs.layout import RunDir


def load_model(source: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
               dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> Decoder:
    """`qatune.load_model`: a native `Decoder` (`forward(input_ids) -> logits [batch, seq, vocab]`), in eval mode.

    `source`: a local Hugging Face directory, a hub id (`gpt2`), a `.gguf` file, or `smollm2-135m`.
    `adapter`: a LoRA adapter directory in peft's format (saved by qatune or by peft), applied on top.
    `dtype`: e.g. `torch.bfloat16` or "bf16"; default float32. `device`: default "cpu"."""
    model = load_base_model(source, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def load_for_inference(source: str | os.PathLike, *, dtype=None, device=None, tokenizer: str | None = None
                       ) -> tuple[Decoder, object]:
    """A model and its tokenizer from a model source or a run directory (`RUN/adapter` or `RUN/model`)."""
    p, run_dir = Path(source), RunDir(source)
    result = run_dir.result
    if run_dir.config.is_file() and result is not None:
        if result == run_dir.model:
            return load_for_inference(result, dtype=dtype, device=device, tokenizer=tokenizer)
        run = run_dir.read_config()
        base = base_model_of(run_dir, str(run["model"]))
        model = load_base_model(base, dtype=dtype, device=device)
        load_adapter(model, result)
        tok_source = tokenizer or (result if has_tokenizer(result) else run.get("tokenizer") or base)
        return model, load_tokenizer(tok_source)
    if (p / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{p} is an adapter: pass the base model and `--adapter {p}`")
    if run_dir.config.is_file() and not (p / "config.json").is_file():
        raise ModelError(f"{p} is a qatune run without a result (no adapter/ or model/ yet): its training has not "
                         f"finished; continue it with `qatune train ... out={p} resume=true`")
    model = load_base_model(source, dtype=dtype, device=device)
    return model, load_tokenizer(tokenizer or source)


def local_model_path(model: str) -> Path | None:
    """The local file or folder that a `model=` value names, as `load_base_model` decides (None for the alias
    and for a hub id)."""
    if model.lower() in ALIASES:
        return None
    path = Path(model).expanduser()
    return path if path.exists() else None


def base_model_of(run: RunDir, model: str) -> str:
    """The base model a LoRA run was trained on, wherever the command runs: the absolute path recorded in
    base.json, checked to be the same files (`RunDir.recorded_base`). A run written before base.json has only
    config.yaml's `model`; a relative path there is taken relative to the run directory, since the folder
    training ran in is unknown: when it is not there but exists relative to this folder, that may be another
    model, so it is refused rather than guessed."""
    recorded = run.recorded_base()
    if recorded is not None or run.base.is_file():
        return recorded or model
    path = Path(model).expanduser()
    if model.lower() in ALIASES or path.is_absolute():
        return model
    if (run.path / path).exists():
        return str(run.path / path)
    if path.exists():
        raise ModelError(f"{run.config} names its base model by the relative path {model}, which was relative to "
                         f"the folder training ran in (not recorded by this run); it is not in {run.path}. Write "
                         "the base model's absolute path into config.yaml's model:")
    return model


def run_data_section(source: str | os.PathLike) -> dict | None:
    """The `data` section of a run directory's config.yaml (None for a model source), read as plain YAML:
    using a run must not fail because it was trained by a qatune that knows other config keys."""
    run = RunDir(source).read_config()
    return run.get("data", {}) if run is not None else None
