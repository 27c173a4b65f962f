"""LoRA on the native `Decoder`: the layer, target selection, trainable marking, merge/unmerge, parameter counts.

A LoRA layer adds `scaling * B @ A` to a frozen weight. The native model fuses q/k/v into one `attn.qkv` linear,
so one `LoRALinear` may hold several LoRA pairs, each over a block of output rows ("parts"): the whole layer,
or the q, k and v slices. Hugging Face names of the modules come from `weights.LINEAR_MAPS` only, so targets,
adapters and merged checkpoints agree with the weight loader by construction.

Target names, the same for both families (`target_table(cfg)` lists them for a model):
`q` `k` `v` `o` `up` `gate` (Llama) `down`, `all-linear` (every linear in the blocks, not the LM head, as peft),
`qkv` (GPT-2 only: one pair over the whole fused `c_attn`, peft's GPT-2 default), and the Hugging Face module
names (`c_attn`, `c_fc`, `c_proj` = both `o` and `down` as peft matches it by suffix; `q_proj` ... `down_proj`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import QatuneError
from .weights import LINEAR_MAPS, LinearMap, qkv_slice

BIAS_MODES = ("none", "all", "lora_only")
WHOLE = "all"  # part name of a pair that covers every output row of its layer
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q", "v"]}  # what peft adapts by default for these families


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters. `targets=None` means the family default (peft's): gpt2 `c_attn`, llama `q`, `v`.

    `bias`: "none" trains no bias, "all" every bias of the model, "lora_only" the biases of adapted layers
    (peft's meanings, so the counts and saved adapters match peft's)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    targets: list[str] | None = None
    use_rslora: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise QatuneError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise QatuneError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise QatuneError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise QatuneError(f"unknown LoRA bias mode {self.bias!r}; use one of {', '.join(BIAS_MODES)}")
        if self.targets is not None and not self.targets:
            raise QatuneError("LoRA targets is empty; leave it unset for the model family's default")


@dataclass(frozen=True)
class LoRAPart:
    """One LoRA pair: the output rows of the base weight it updates, its rank and its alpha."""

    rows: slice
    r: int
    alpha: float


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`self.base`, left where it was so its weights are not copied) plus LoRA pairs.

    `lora_A[part]` is `[r, in]` (Kaiming-uniform, as peft), `lora_B[part]` is `[rows, r]` (zeros, so a fresh
    adapter computes exactly what the base does). A half-precision base gets fp32 LoRA weights (as peft's
    default `autocast_adapter_dtype`): the LoRA path runs in the LoRA dtype and is cast to the base output dtype.
    Dropout is applied once to the input and shared by the pairs of the layer."""

    def __init__(self, base: nn.Linear, parts: dict[str, LoRAPart], *, dropout: float, use_rslora: bool):
        super().__init__()
        self.base = base
        self.parts = dict(sorted(parts.items(), key=lambda kv: kv[1].rows.start))  # in row order: q, k, v
        self.use_rslora = use_rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        weight = base.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, part in self.parts.items():
            a = torch.empty(part.r, base.in_features, dtype=dtype, device=weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            n_rows = part.rows.stop - part.rows.start
            self.lora_B[name] = nn.Parameter(torch.zeros(n_rows, part.r, dtype=dtype, device=weight.device))

    def scaling(self, name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (rslora keeps updates stable as r grows)."""
        part = self.parts[name]
        return part.alpha / (math.sqrt(part.r) if self.use_rslora else part.r)

    def delta_weight(self, name: str) -> Tensor:
        """`scaling * B @ A` for one part: the update to its rows of the base weight, in the LoRA dtype."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling(name)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x).to(self.lora_A[next(iter(self.parts))].dtype)
        # Out of place: the base output may be a view of a tensor autograd does not track (frozen layer,
        # input without grad), which an in-place add of a tracked delta is not allowed to modify.
        pieces, done = [], 0
        for name, part in self.parts.items():
            delta = ((h @ self.lora_A[name].t()) @ self.lora_B[name].t() * self.scaling(name)).to(out.dtype)
            if part.rows.start > done:
                pieces.append(out[..., done:part.rows.start])
            pieces.append(out[..., part.rows] + delta)
            done = part.rows.stop
        if done < out.shape[-1]:
            pieces.append(out[..., done:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)  # whole layer: no extra copy

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA update into the base weight (faster inference); forward then skips the LoRA path."""
        if not self.merged:
            for name, part in self.parts.items():
                self.base.weight[part.rows] += self.delta_weight(name).to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what `merge` added: the base weight comes back within float rounding."""
        if self.merged:
            for name, part in self.parts.items():
                self.base.weight[part.rows] -= self.delta_weight(name).to(self.base.weight.dtype)
            self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The base weight with the LoRA update folded in, as a new tensor (this layer is not modified)."""
        weight = self.base.weight.detach().clone()
        if not self.merged:
            for name, part in self.parts.items():
                weight[part.rows] += self.delta_weight(name).to(weight.dtype)
        return weight

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}: rows {p.rows.start}:{p.rows.stop} r={p.r} alpha={p.alpha}"
                          for n, p in self.parts.items())
        return f"{parts}, rslora={self.use_rslora}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------------- targets


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
        raise QatuneError(
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
            raise QatuneError(
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


# ---------------------------------------------------------------------------------------------------- model level


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
        raise QatuneError("the model already has LoRA layers; merge_lora() them before applying another adapter")
    cfg: ModelConfig = model.config
    hf_splits_qkv = any(m.part for m in LINEAR_MAPS[cfg.family])
    for name, parts in layout.items():
        base = model.get_submodule(name)
        covers_all = sum(p.rows.stop - p.rows.start for p in parts.values()) == base.out_features
        if config.bias == "lora_only" and base.bias is not None and hf_splits_qkv and not covers_all:
            # Hugging Face keeps q/k/v biases apart, so "lora_only" would train only some rows of the fused bias.
            raise QatuneError(
                f"bias='lora_only' with LoRA on only some of q/k/v of {name} is not supported for "
                f"{cfg.family} models with attention biases; use bias='all' or target all of q, k and v"
            )
    for name, parts in layout.items():
        parent, _, attr = name.rpartition(".")
        base = model.get_submodule(name)
        wrapped = LoRALinear(base, parts, dropout=config.dropout, use_rslora=config.use_rslora)
        wrapped.train(base.training)  # a model in eval mode must not start applying LoRA dropout
        setattr(model.get_submodule(parent), attr, wrapped)
    model.lora_config = config
    _mark_trainable(model, config.bias)
    return list(layout)


def _mark_trainable(model: nn.Module, bias: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in (*layer.lora_A.values(), *layer.lora_B.values()):
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
    """What an adapter holds, under native names: every LoRA A and B, and the biases the bias mode trains."""
    bias = model.lora_config.bias
    adapted = {f"{name}.base.bias" for name in lora_layers(model)}
    return {
        k: v for k, v in model.state_dict().items()
        if ".lora_A." in k or ".lora_B." in k
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
