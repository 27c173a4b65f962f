"""Read a GGUF file (llama or gpt2 architecture) as a Hugging Face config dict and Hugging Face-named tensors.

Quantised tensors are dequantised with the `gguf` package. llama.cpp's converter permutes the rows of q and k
for its interleaved RoPE; we undo that so the weights match Hugging Face's rotate-half layout. For gpt2 it
stores the `Conv1D` weights `[out, in]`; they go back to Hugging Face's `[in, out]`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from torch import Tensor

from qatune.errors import ModelError
from qatune.models.gguf_header import check_gguf_header

_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "ffn_norm": "ln_2",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_TRANSPOSED = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (interleaved pairs -> two halves per head)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: Path) -> GGUFReader:
    """A reader of a complete GGUF file; a truncated (an interrupted download) or foreign file is one
    `ModelError` naming it, whatever part of the parse it breaks."""
    try:
        check_gguf_header(path)  # counts and sizes the header declares, before GGUFReader trusts them
        reader = GGUFReader(str(path))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, IndexError, struct.error) as e:  # what a truncated or foreign file raises
        raise ModelError(f"cannot read GGUF file {path} (truncated, or not a GGUF file): {e}") from e
    size = Path(path).stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(f"GGUF file {path} is truncated: its tensors end at byte {end}, the file has {size}")
    return reader


def read_gguf(path: Path) -> tuple[dict, Iterator[tuple[str, Tensor]]]:
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "gpt2"):
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama' and 'gpt2')")
    names = {t.name for t in reader.tensors}
    hf_config = _llama_config(reader, names, path) if arch == "llama" else _gpt2_config(reader, names, path)
    hf_config.update(
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )
    n_head = hf_config.get("num_attention_heads")
    n_kv = hf_config.get("num_key_value_heads")

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for t in reader.tensors:
            try:  # a shape that does not fit the header's head counts
                hf_name, w = _hf_tensor(t, arch, n_head, n_kv)
            except ValueError as e:
                raise ModelError(f"{path}: tensor {t.name} {tuple(int(x) for x in t.shape)} does not fit the "
                                 f"model's dimensions: {e}") from None
            yield hf_name, torch.from_numpy(np.array(w, dtype=np.float32))  # own, writable copy

    return hf_config, tensors()


def _hf_tensor(t, arch: str, n_head: int, n_kv: int) -> tuple[str, np.ndarray]:
    """A GGUF tensor dequantised, with its Hugging Face name and layout."""
    w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape([int(x) for x in reversed(t.shape)])  # GGML lists dims fastest-first
    if arch == "gpt2":
        return _hf_name(t.name, _GPT2_NAMES, _GPT2_BLOCK, "transformer.h"), w.T if _is_gpt2_conv1d(t.name) else w
    if ".attn_q." in t.name:
        w = _unpermute(w, n_head)
    elif ".attn_k." in t.name:
        w = _unpermute(w, n_kv)
    return _hf_name(t.name, _LLAMA_NAMES, _LLAMA_BLOCK, "model.layers"), w


class _Keys:
    """The GGUF's metadata as the numbers a config needs: a missing required key, a value of the wrong type or
    a count below 1 is a `ModelError` naming the file and the key."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def _get(self, key: str, default, kinds: tuple[type, ...], what: str):
        value = _field(self.reader, key, default)
        if value is None:
            raise ModelError(f"{self.path}: GGUF key {key} is missing ({what})")
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ModelError(f"{self.path}: GGUF key {key} must be {what}, got {value!r:.80}")
        return value

    def count(self, key: str, default=None) -> int:
        value = self._get(key, default, (int,), "a whole number >= 1")
        if value < 1:
            raise ModelError(f"{self.path}: GGUF key {key} must be a whole number >= 1, got {value}")
        return value

    def number(self, key: str, default: float) -> float:
        return float(self._get(key, default, (int, float), "a number"))


def _vocab_size(reader, keys: _Keys) -> int:
    if _field(reader, "llama.vocab_size") is not None:
        return keys.count("llama.vocab_size")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is not None and len(embed.shape) == 2:
        return int(embed.shape[1])
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelError(f"{keys.path}: the vocabulary size is unknown: no token_embd.weight tensor and no "
                         "tokenizer.ggml.tokens key")
    return len(tokens.data)


def _llama_config(reader, names: set[str], path: Path) -> dict:
    keys = _Keys(reader, path)
    n_head = keys.count("llama.attention.head_count")
    d_model = keys.count("llama.embedding_length")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _vocab_size(reader, keys),
        "hidden_size": d_model,
        "intermediate_size": keys.count("llama.feed_forward_length"),
        "num_hidden_layers": keys.count("llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": keys.count("llama.attention.head_count_kv", n_head),
        "head_dim": keys.count("llama.rope.dimension_count", d_model // n_head or None),
        "max_position_embeddings": keys.count("llama.context_length", 2048),
        "rms_norm_eps": keys.number("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": keys.number("llama.rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
    }


def _gpt2_config(reader, names: set[str], path: Path) -> dict:
    keys = _Keys(reader, path)
    d_model = keys.count("gpt2.embedding_length")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": _vocab_size(reader, keys),
        "n_embd": d_model,
        "n_inner": keys.count("gpt2.feed_forward_length", 4 * d_model),
        "n_layer": keys.count("gpt2.block_count"),
        "n_head": keys.count("gpt2.attention.head_count"),
        "n_positions": keys.count("gpt2.context_length", 1024),
        "layer_norm_epsilon": keys.number("gpt2.attention.layer_norm_epsilon", 1e-5),
        "activation_function": "gelu_new",  # llama.cpp's gpt2 graph: GELU, tanh approximation
    }


def _is_gpt2_conv1d(name: str) -> bool:
    parts = name.split(".")  # blk.{i}.{kind}.weight
    return len(parts) == 4 and parts[2] in _GPT2_TRANSPOSED and parts[3] == "weight"


def _hf_name(name: str, top: dict[str, str], block: dict[str, str], prefix: str) -> str:
    if name in top:
        return top[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight|bias
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in block:
        return f"{prefix}.{parts[1]}.{block[parts[2]]}.{parts[3]}"
    return name  # reported as unexpected by the caller
