"""`qatune export RUN_OR_MODEL OUT.gguf`: a run (LoRA merged first, or a full fine-tuning result) or a plain model
as one GGUF file that llama.cpp, Ollama and LM Studio run (`gguf_writer.py` writes it, `gguf_vocab.py` its
tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

from qatune.errors import ModelError
from qatune.generation.runs import load_for_inference
from qatune.lora.inject import merged_state_dict
from qatune.publish.gguf_writer import GGUF_TYPES, write_gguf
from qatune.runs.layout import RunDir
from qatune.utils.io import remove_leftovers_beside


def export_gguf(source: str | os.PathLike, out_path: str | os.PathLike, *, out_type: str = "f16",
                tokenizer: str | None = None) -> Path:
    """Write `source` (a run directory, a model directory, a hub id, a .gguf or an alias) to `out_path` as GGUF
    of `out_type` (f32 | f16 | bf16 | q8_0). The model is loaded in fp32 and its LoRA layers are folded into
    the weights, so the file holds exactly the function qatune computes (up to the chosen type)."""
    if out_type not in GGUF_TYPES:
        raise ModelError(f"unknown GGUF type {out_type!r}; use one of {', '.join(GGUF_TYPES)}")
    if Path(out_path).suffix != ".gguf":
        raise ModelError(f"the output file must end in .gguf (llama.cpp and Ollama look for it): {out_path}")
    model, tok = load_for_inference(source, tokenizer=tokenizer)
    remove_leftovers_beside(out_path)  # the scratch file of an interrupted export (it is written beside, renamed)
    name, base_model = _names(Path(source))
    return write_gguf(model.config, merged_state_dict(model), tok, out_path, out_type=out_type, name=name,
                      base_model=base_model)


def _names(source: Path) -> tuple[str, str | None]:
    """`general.name` and the base model: a run is named after its directory and names its base model."""
    run = RunDir(source).read_config()
    if run is not None:
        return source.resolve().name, str(run.get("model")) if run.get("model") else None
    return source.stem if source.suffix == ".gguf" else source.name, None
