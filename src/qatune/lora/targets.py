"""Which linear layers LoRA adapts: target names -> modules (and q/k/v slices of the fused attention input).

Target names, the same for both families (`target_table(cfg)` lists them for a model):
`q` `k` `v` `o` `up` `gate` (Llama) `down`, `all-linear` (every linear in the blocks, not the LM head, as peft),
`qkv` (GPT-2 only: one pair over the whole fused `c_attn`, peft's GPT-2 default), and the Hugging Face module
names (`c_attn`, `c_fc`, `c_proj` = both `o` and `down` as peft matches it by suffix; `q_proj` ... `down_proj`).
Hugging Face names come from `models.weights.LINEAR_MAPS` only, so targets, adapters and merged checkpoints
agree with the weight loader by construction.
"""

from __future__ import annotations

from torch import nn

from qatune.errors import ConfigError
from qatune.lora.layer import WHOLE, LoRAConfig, LoRAPart
from qatune.models.config import ModelConfig
from qatune.models.weights import LINEAR_MAPS, LinearMap, qkv_slice

DEFAULT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q", "v"]}  # what peft adapts by default for these families


def family_linears(cfg: ModelConfig) -> list[LinearMap]:
    """The `LINEAR_MAPS` entries this model has (GPT-2-style MLPs have no gate)."""
    return [m for m in LINEAR_MAPS[cfg.family] if m.native != "mlp.gate" or cfg.mlp == "swiglu"]


def target_table(cfg: ModelConfig) -> dict[str, list[tuple[str, str | None]]]:
    """Every target name valid for this model -> the (module inside a block, qkv part or None) pairs it adapts."""
    table: dict[str, list[tuple[str, str | None]]] = {}
    linears = family_linears(cfg)
    for m in linears:
        short = m.part or m.native.rpartition(".")[2]  # Llama: q/k/v; otherwise qkv, o, up, gate, down
        for name in (short, m.hf.rpartition(".")[2]):
            table.setdefault(name, []).append((m.native, m.part))
    for part in ("q", "k", "v"):  # GPT-2: slices of the fused c_attn, which Hugging Face has no module for
        table.setdefault(part, [("attn.qkv", part)])
    table["all-linear"] = list(dict.fromkeys((m.native, m.part) for m in linears))
    return table


def resolve_targets(cfg: ModelConfig, targets: list[str]) -> dict[str, list[str | None]]:
    """Target names -> {module inside a block: its qkv parts (or [None] for the whole layer)}."""
    table = target_table(cfg)
    unknown = [t for t in targets if t not in table]
    if unknown:
        raise ConfigError(
            f"unknown LoRA target(s) {', '.join(map(repr, unknown))} for a {cfg.family} model; "
            f"valid targets: {', '.join(table)}"
        )
    chosen: dict[str, list[str | None]] = {}
    for t in targets:
        for module, part in table[t]:
            parts = chosen.setdefault(module, [])
            if part not in parts:
                parts.append(part)
    for module, parts in chosen.items():
        if None in parts and len(parts) > 1:
            raise ConfigError(
                f"LoRA targets {targets} adapt {module} both as a whole and as q/k/v slices; choose one of the two"
            )
    return chosen


def lora_layout(model: nn.Module, config: LoRAConfig) -> dict[str, dict[str, LoRAPart]]:
    """{module name: {part name: LoRAPart}} for every block of `model`, from `config.targets`."""
    cfg: ModelConfig = model.config
    chosen = resolve_targets(cfg, config.targets or DEFAULT_TARGETS[cfg.family])
    layout: dict[str, dict[str, LoRAPart]] = {}
    for i in range(cfg.n_layer):
        for module, parts in chosen.items():
            name = f"blocks.{i}.{module}"
            out_features = model.get_submodule(name).out_features
            rows = {p: qkv_slice(cfg, p) for p in parts if p} or {WHOLE: slice(0, out_features)}
            layout[name] = {p: LoRAPart(sl, config.r, config.alpha) for p, sl in rows.items()}
    return layout
