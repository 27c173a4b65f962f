"""Write a native model (its state dict, config and tokenizer) as a GGUF file for llama.cpp, Ollama, LM Studio.

It follows llama.cpp's `convert_hf_to_gguf.py` step by step, with the `gguf` package's own writer and name
tables: the tensors go to Hugging Face names first (`weights.native_to_hf`, the table loading and saving use),
then to GGUF names through `gguf.get_tensor_name_map` (llama.cpp's table), with the converter's two layout
changes: GPT-2's `Conv1D` weights are stored `[out, in]`, and Llama's q/k rows are permuted for llama.cpp's
interleaved RoPE (the inverse of `gguf_reader._unpermute`). Norms, biases and GPT-2's position embeddings stay
f32 whatever the type, as llama.cpp's converter and quantizer keep them; a q8_0 tensor whose rows are not a
multiple of 32 falls back to f16, as there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    QuantError,
    get_tensor_name_map,
)
from gguf.quants import quantize
from torch import Tensor

from qatune.errors import ModelError
from qatune.models.config import ModelConfig
from qatune.models.weights import native_to_hf
from qatune.publish.gguf_vocab import gguf_vocab
from qatune.utils.io import write_file_atomically

# --type choices: (tensor type of the matrices, general.file_type)
GGUF_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
_ARCHS = {"llama": MODEL_ARCH.LLAMA, "gpt2": MODEL_ARCH.GPT2}
_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # stored [in, out] by Hugging Face


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse what llama.cpp's `llama` / `gpt2` graphs would compute differently."""
    if cfg.family not in _ARCHS:
        raise ModelError(f"cannot export a {cfg.family!r} model to GGUF (supported: gpt2, llama)")
    if cfg.family == "gpt2" and cfg.mlp != "gelu_tanh":
        raise ModelError(f"cannot export a GPT-2 model with activation {cfg.mlp!r} to GGUF: llama.cpp's gpt2 "
                         "graph uses GELU (tanh approximation)")
    if cfg.family == "gpt2" and cfg.n_kv_head != cfg.n_head:
        raise ModelError("cannot export a GPT-2 model with grouped-query attention to GGUF")


def write_gguf(cfg: ModelConfig, state: dict[str, Tensor], tokenizer, out_path: str | os.PathLike, *,
               out_type: str = "f16", name: str | None = None, base_model: str | None = None) -> Path:
    """Write `state` (a plain `Decoder`'s tensors, LoRA merged) with its tokenizer to `out_path` (atomically).

    `out_type`: f32 | f16 | bf16 | q8_0. `name` goes to `general.name`, `base_model` to
    `general.base_model.0.name`."""
    if out_type not in GGUF_TYPES:
        raise ModelError(f"unknown GGUF type {out_type!r}; use one of {', '.join(GGUF_TYPES)}")
    check_exportable(cfg)
    if tokenizer is None:
        raise ModelError("a GGUF file carries its tokenizer: pass the tokenizer the model was trained with")
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    qtype, file_type = GGUF_TYPES[out_type]
    arch = _ARCHS[cfg.family]

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), MODEL_ARCH_NAMES[arch])
        writer.add_type("model")
        writer.add_name(name or f"{cfg.family}-qatune")
        if base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_model)
        _add_hparams(writer, cfg)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(GGML_QUANT_VERSION)
        vocab.add_to(writer)
        for gguf_name, data, tensor_type in gguf_tensors(cfg, state, qtype):
            writer.add_tensor(gguf_name, data, raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_file_atomically(out_path, write)


def _add_hparams(writer: GGUFWriter, cfg: ModelConfig) -> None:
    """The `{arch}.*` keys llama.cpp reads for this architecture (the converter's `set_gguf_parameters`)."""
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.max_positions)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    if cfg.family == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_head != cfg.d_model:  # llama.cpp assumes d_model / n_head otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotate-half halves interleaved (`LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, state: dict[str, Tensor], qtype: GGMLQuantizationType):
    """(GGUF name, data, GGML type) for every tensor, in Hugging Face order, converted as llama.cpp's converter
    converts them."""
    name_map = get_tensor_name_map(_ARCHS[cfg.family], cfg.n_layer)
    for hf_name, tensor in native_to_hf(state, cfg):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor {hf_name} of a {cfg.family} model")
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if cfg.family == "gpt2" and hf_name.endswith(_GPT2_CONV1D):
            data = data.T
        elif cfg.family == "llama" and ".q_proj." in hf_name:
            data = _permute(data, cfg.n_head)
        elif cfg.family == "llama" and ".k_proj." in hf_name:
            data = _permute(data, cfg.n_kv_head)
        data = np.ascontiguousarray(data)
        tensor_type = qtype
        if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or gguf_name.startswith("position_embd."):
            tensor_type = GGMLQuantizationType.F32
        try:
            yield gguf_name, quantize(data, tensor_type), tensor_type
        except QuantError:  # q8_0 needs rows in blocks of 32 values
            yield gguf_name, quantize(data, GGMLQuantizationType.F16), GGMLQuantizationType.F16
