"""`qatune merge RUN OUT`: a LoRA run as a standalone Hugging Face checkpoint, the adapter folded into the base
weights (for tools that do not read peft adapters)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from qatune.errors import ModelError
from qatune.generation.runs import load_for_inference
from qatune.lora.adapters import ADAPTER_CONFIG, save_merged
from qatune.runs.layout import CARD, RunDir
from qatune.utils.io import remove_leftovers_beside, replace_dir_atomically

# What a Hugging Face model folder holds (what `save_merged`, `save_pretrained` and a tokenizer write): a folder
# holding only these, config.json among them, may be replaced whole; anything else in it is someone's file.
_MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                       "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                       "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                       "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", CARD)


def merge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """`qatune merge RUN OUT`: a LoRA run directory (`RUN/config.yaml` naming the base model, `RUN/adapter`)
    -> a standalone Hugging Face checkpoint in OUT, tokenizer included.

    OUT is written as a fresh folder beside it and swapped in whole, so no file of a previous model in OUT (a
    stale shard, a shard index that the loader would follow) survives, and a kill leaves the old OUT or the new
    one; the temporaries of an interrupted merge are removed first. An OUT that holds other files is refused."""
    run = RunDir(run_dir)
    if not (run.adapter / ADAPTER_CONFIG).is_file() or not run.config.is_file():
        raise ModelError(f"{run.path} is not a LoRA run directory: expected config.yaml and adapter/{ADAPTER_CONFIG}")
    out = Path(out_dir)
    check_model_folder_target(out)
    model, tokenizer = load_for_inference(run.path)
    remove_leftovers_beside(out)
    return replace_dir_atomically(out, lambda tmp: save_merged(model, tokenizer, tmp))


def check_model_folder_target(out: Path) -> None:
    """Refuse to replace `out` unless it is absent, empty, or a model folder (config.json and only a model's
    files): its other files are named."""
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file, not a model folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    others = [n for n in entries if not any(fnmatch.fnmatchcase(n, pattern) for pattern in _MODEL_FOLDER_FILES)]
    if "config.json" not in entries or others:
        shown = others or entries
        raise ModelError(f"{out} is not a model folder that merge may replace: it holds "
                         f"{', '.join(shown[:4])}{f' and {len(shown) - 4} more' if len(shown) > 4 else ''}; "
                         "choose an empty or new folder")
