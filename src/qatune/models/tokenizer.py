"""`load_tokenizer(source)`: the Hugging Face tokenizer that goes with a model source."""

from __future__ import annotations

import os
from pathlib import Path

from qatune.errors import ModelError
from qatune.models.gguf_reader import open_gguf
from qatune.models.loading import ResolvedSource, resolve_source

# The files one of which every Hugging Face tokenizer directory holds (fast, byte-level BPE, sentencepiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


def load_tokenizer(source: str | os.PathLike):
    """A transformers tokenizer: GPT-2 BPE for GPT-2 checkpoints, the GGUF's own tokenizer for GGUF files.

    A model directory without tokenizer files (e.g. a random checkpoint) is an error naming the directory;
    pass a tokenizer directory explicitly in that case (e.g. the `gpt2` hub id for GPT-2's own).
    A pad token is always set (EOS when the tokenizer has none) so batches can be padded."""
    from transformers import AutoTokenizer  # heavy (seconds): imported when a tokenizer is needed, not with qatune

    # A tokenizer-only directory (no config.json) is fine here; anything else resolves like a model source.
    resolved = ResolvedSource(Path(source)) if Path(source).is_dir() else resolve_source(source)
    if resolved.gguf_file:
        open_gguf(resolved.gguf_path)  # a truncated file is one clear error, not a traceback from transformers
    elif not has_tokenizer(resolved.path):  # checked here: some transformers versions fail with a TypeError
        raise ModelError(f"no tokenizer in {resolved.path} (none of {', '.join(TOKENIZER_FILES)}): pass the "
                         "tokenizer's source explicitly (tokenizer=...)")
    try:
        if resolved.gguf_file:
            tok = AutoTokenizer.from_pretrained(str(resolved.path), gguf_file=resolved.gguf_file)
        else:
            tok = AutoTokenizer.from_pretrained(str(resolved.path))
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer in {resolved.path}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)
