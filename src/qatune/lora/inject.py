"""LoRA on a whole model: wrap the target layers, mark what trains, merge and unmerge, count parameters."""

from __future__ import annotations

from torch import Tensor, nn

from qatune.errors import ConfigError, ModelError
from qatune.lora.initial import init_lora_layers
from qatune.lora.layer import LoRAConfig, LoRALinear, LoRAPart
from qatune.lora.targets import lora_layout
from qatune.models.config import ModelConfig
from qatune.models.weights import LINEAR_MAPS


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace the target linears of `model` by `LoRALinear` and freeze everything but LoRA (and `bias` mode's
    biases). Returns the names of the wrapped modules."""
    return inject_lora(model, lora_layout(model, config), config)


def inject_lora(model: nn.Module, layout: dict[str, dict[str, LoRAPart]], config: LoRAConfig) -> list[str]:
    """Wrap the modules of an explicit layout (`apply_lora` computes one from targets, `load_adapter` reads one
    from a file), remember `config` as `model.lora_config` and mark what trains."""
    if lora_layers(model):
        raise ModelError("the model already has LoRA layers; merge_lora() them before applying another adapter")
    cfg: ModelConfig = model.config
    hf_splits_qkv = any(m.part for m in LINEAR_MAPS[cfg.family])
    for name, parts in layout.items():
        base = model.get_submodule(name)
        covers_all = sum(p.rows.stop - p.rows.start for p in parts.values()) == base.out_features
        if config.bias == "lora_only" and base.bias is not None and hf_splits_qkv and not covers_all:
            # Hugging Face keeps q/k/v biases apart, so "lora_only" would train only some rows of the fused bias.
            raise ConfigError(
                f"bias='lora_only' with LoRA on only some of q/k/v of {name} is not supported for "
                f"{cfg.family} models with attention biases; use bias='all' or target all of q, k and v"
            )
    for name, parts in layout.items():
        parent, _, attr = name.rpartition(".")
        base = model.get_submodule(name)
        wrapped = LoRALinear(base, parts, dropout=config.dropout, use_rslora=config.use_rslora,
                             fast_dropout=getattr(model, "cpu_kernels", False), use_dora=config.use_dora)
        wrapped.train(base.training)  # a model in eval mode must not start applying LoRA dropout
        setattr(model.get_submodule(parent), attr, wrapped)
    model.lora_config = config
    _mark_trainable(model, config.bias)
    init_lora_layers(lora_layers(model), config.init)  # PiSSA / OLoRA: from the base weights, leaving the residual
    return list(layout)


def _mark_trainable(model: nn.Module, bias: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in (*layer.lora_A.values(), *layer.lora_B.values(), *layer.lora_magnitude_vector.values()):
            p.requires_grad_(True)
        if bias == "lora_only" and layer.base.bias is not None:
            layer.base.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)


def merge_lora(model: nn.Module, *, unwrap: bool = True) -> list[str]:
    """Fold every LoRA update into its base weight. With `unwrap` (default) each `LoRALinear` is replaced by
    its base `nn.Linear`, so the model is a plain `Decoder` again (requires_grad flags are left as they are);
    with `unwrap=False` the layers stay wrapped and `unmerge_lora` can take the updates out again."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        layer.merge()
        if unwrap:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.base)
    if unwrap and layers:
        del model.lora_config
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo `merge_lora(model, unwrap=False)`: base weights are restored within float rounding."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return list(layers)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What an adapter holds, under native names: every LoRA A and B (and DoRA magnitude), and the biases the bias
    mode trains."""
    bias = model.lora_config.bias
    adapted = {f"{name}.base.bias" for name in lora_layers(model)}
    return {
        k: v for k, v in model.state_dict().items()
        if ".lora_A." in k or ".lora_B." in k or ".lora_magnitude_vector." in k
        or (bias == "all" and k.endswith(".bias")) or (bias == "lora_only" and k in adapted)
    }


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under a plain `Decoder`'s names, LoRA updates folded into new tensors for the adapted
    weights (the model itself is not modified; unadapted tensors are shared, not copied)."""
    state = model.state_dict()
    for name, layer in lora_layers(model).items():
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state[f"{name}.weight"] = layer.merged_weight()
        if layer.base.bias is not None:
            state[f"{name}.bias"] = layer.base.bias.detach()
    return state


def count_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable percent), tied parameters counted once: the numbers peft's
    `get_nb_trainable_parameters()` gives for the same configuration."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total, 100.0 * trainable / total if total else 0.0


def format_parameter_count(model: nn.Module) -> str:
    """e.g. "Trainable parameters: 294,912 / 124,734,720 (0.2364%)"."""
    trainable, total, percent = count_parameters(model)
    return f"Trainable parameters: {trainable:,} / {total:,} ({percent:.4f}%)"
