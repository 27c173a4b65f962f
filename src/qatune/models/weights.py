"""Hugging Face <-> native tensor names and layouts.

One table per family says which Hugging Face module each native linear layer corresponds to. Weight
loading, merged-model saving and peft adapters all read these tables, so the three can never disagree.

Two layout differences are handled here and nowhere else:
- GPT-2 stores its linear layers as `Conv1D` with weights `[in, out]`: transposed on load and on save;
- Llama keeps q/k/v in three matrices; the native model fuses them into one `attn.qkv` (rows q, then k, then v).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from qatune.errors import ModelError
from qatune.models.config import ModelConfig


@dataclass(frozen=True)
class LinearMap:
    native: str  # module path inside a block, e.g. "attn.qkv"
    hf: str  # module path inside a Hugging Face block, e.g. "attn.c_attn"
    part: str | None = None  # "q" / "k" / "v": this HF module is that slice of the native fused qkv


LINEAR_MAPS: dict[str, list[LinearMap]] = {
    "gpt2": [
        LinearMap("attn.qkv", "attn.c_attn"),
        LinearMap("attn.o", "attn.c_proj"),
        LinearMap("mlp.up", "mlp.c_fc"),
        LinearMap("mlp.down", "mlp.c_proj"),
    ],
    "llama": [
        LinearMap("attn.qkv", "self_attn.q_proj", "q"),
        LinearMap("attn.qkv", "self_attn.k_proj", "k"),
        LinearMap("attn.qkv", "self_attn.v_proj", "v"),
        LinearMap("attn.o", "self_attn.o_proj"),
        LinearMap("mlp.gate", "mlp.gate_proj"),
        LinearMap("mlp.up", "mlp.up_proj"),
        LinearMap("mlp.down", "mlp.down_proj"),
    ],
}

# Where blocks live in the Hugging Face *ForCausalLM model, and the non-linear tensors (native name -> HF name).
HF_BLOCK_PREFIX = {"gpt2": "transformer.h.{i}.", "llama": "model.layers.{i}."}
_HF_NORMS = {
    "gpt2": {"norm_attn": "ln_1", "norm_mlp": "ln_2"},
    "llama": {"norm_attn": "input_layernorm", "norm_mlp": "post_attention_layernorm"},
}
_HF_TOP = {
    "gpt2": {
        "embed.weight": "transformer.wte.weight",
        "pos_embed.weight": "transformer.wpe.weight",
        "norm.weight": "transformer.ln_f.weight",
        "norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    "llama": {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
}
# Tensors some checkpoints carry that are not weights (old GPT-2 causal-mask buffers, rotary caches).
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")
# GPT-2 checkpoints saved from GPT2Model (the original `gpt2` on the hub) have no "transformer." prefix.
_GPT2_BARE = re.compile(r"^(wte|wpe|ln_f|h\.\d+)\.")


def is_transposed(cfg: ModelConfig) -> bool:
    """GPT-2's Conv1D stores weights as [in, out]; peft calls this `fan_in_fan_out`."""
    return cfg.family == "gpt2"


def qkv_slice(cfg: ModelConfig, part: str) -> slice:
    """Rows of the fused native qkv weight that hold q, k or v."""
    start = {"q": 0, "k": cfg.q_size, "v": cfg.q_size + cfg.kv_size}[part]
    return slice(start, start + (cfg.q_size if part == "q" else cfg.kv_size))


def hf_name_table(cfg: ModelConfig) -> dict[str, tuple[str, str | None, bool]]:
    """HF tensor name -> (native tensor name, qkv part or None, transpose?) for every tensor of the model."""
    table: dict[str, tuple[str, str | None, bool]] = {}
    fam = cfg.family
    for native, hf in _HF_TOP[fam].items():
        if native == "pos_embed.weight" and cfg.positions != "learned":
            continue
        if native == "norm.bias" and cfg.norm != "layernorm":
            continue
        if native == "lm_head.weight" and cfg.tie_embeddings:
            continue
        table[hf] = (native, None, False)
    for i in range(cfg.n_layer):
        hp, np_ = HF_BLOCK_PREFIX[fam].format(i=i), f"blocks.{i}."
        params = ["weight", "bias"] if cfg.norm == "layernorm" else ["weight"]
        for native, hf in _HF_NORMS[fam].items():
            for p in params:
                table[f"{hp}{hf}.{p}"] = (f"{np_}{native}.{p}", None, False)
        for m in LINEAR_MAPS[fam]:
            if m.native == "mlp.gate" and cfg.mlp != "swiglu":
                continue
            has_bias = cfg.attn_bias if m.native.startswith("attn") else cfg.mlp_bias
            for p in ["weight", "bias"] if has_bias else ["weight"]:
                table[f"{hp}{m.hf}.{p}"] = (f"{np_}{m.native}.{p}", m.part, p == "weight" and is_transposed(cfg))
    return table


def canonical_hf_name(name: str, cfg: ModelConfig) -> str:
    if cfg.family == "gpt2" and _GPT2_BARE.match(name):
        return "transformer." + name
    return name


def hf_to_native(tensors: Iterable[tuple[str, Tensor]], cfg: ModelConfig, expected: dict[str, torch.Size],
                 convert=lambda native, t: t) -> dict[str, Tensor]:
    """Map a stream of Hugging Face tensors to a native state dict, checking names and shapes.

    `expected` gives the native shapes; `convert(native_name, tensor)` moves each tensor to its target
    dtype/device as it is read, so no second full copy exists. Raises `ModelError` listing every missing,
    unexpected or mis-shaped tensor."""
    table = hf_name_table(cfg)
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    unexpected: list[str] = []
    for name, tensor in tensors:
        hf_name = canonical_hf_name(name, cfg)
        if hf_name not in table:
            if not _IGNORED.search(hf_name) and not (hf_name == "lm_head.weight" and cfg.tie_embeddings):
                unexpected.append(name)
            continue
        native, part, transpose = table[hf_name]
        t = convert(native, tensor.t().contiguous() if transpose else tensor)
        if part is None:
            out[native] = t
        else:
            parts.setdefault(native, {})[part] = t
    for native, p in parts.items():
        if set(p) == {"q", "k", "v"}:
            out[native] = torch.cat([p["q"], p["k"], p["v"]], dim=0)
    wanted = {native for native, _, _ in table.values()}
    missing = sorted(
        hf for hf, (native, part, _) in table.items()
        if native not in out and (part is None or part not in parts.get(native, {}))
    )
    bad_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
        for k, v in out.items() if k in expected and v.shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if bad_shape:
        problems.append(f"mis-shaped tensors: {'; '.join(bad_shape)}")
    if problems:
        raise ModelError("checkpoint does not match its config: " + " | ".join(problems))
    assert set(out) == wanted
    return out


def native_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Native state dict -> Hugging Face tensors (names and layouts as `*ForCausalLM.save_pretrained` writes)."""
    for hf_name, (native, part, transpose) in hf_name_table(cfg).items():
        t = state[native]
        if part is not None:
            t = t[qkv_slice(cfg, part)]
        yield hf_name, (t.t() if transpose else t).contiguous()
