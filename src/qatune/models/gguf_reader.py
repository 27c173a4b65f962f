"""Read a GGUF file (llama architecture) as a Hugging Face config dict and Hugging Face-named tensors.

Quantised tensors are dequantised with the `gguf` package. llama.cpp's converter permutes the rows of q and k
for its interleaved RoPE; we undo that so the weights match Hugging Face's rotate-half layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from torch import Tensor

from qatune.errors import ModelError

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


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (interleaved pairs -> two halves per head)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[dict, Iterator[tuple[str, Tensor]]]:
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError) as e:  # what a truncated or foreign file raises
        raise ModelError(f"cannot read GGUF file {path}: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    d_model = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    hf_config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", d_model // n_head)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for t in reader.tensors:
            hf_name = _hf_name(t.name)
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape([int(x) for x in reversed(t.shape)])  # GGML lists dims fastest-first
            if ".attn_q." in t.name:
                w = _unpermute(w, n_head)
            elif ".attn_k." in t.name:
                w = _unpermute(w, n_kv)
            yield hf_name, torch.from_numpy(np.array(w, dtype=np.float32))  # own, writable copy

    return hf_config, tensors()


def _hf_name(name: str) -> str:
    if name in _LLAMA_NAMES:
        return _LLAMA_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LLAMA_BLOCK:
        return f"model.layers.{parts[1]}.{_LLAMA_BLOCK[parts[2]]}.{parts[3]}"
    return name  # reported as unexpected by the caller
