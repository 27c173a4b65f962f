"""The LoRA layer: a frozen linear plus `scaling * B @ A`, as peft computes it; and its hyper-parameters.

With `use_dora` each pair also has DoRA's magnitude vector (Liu et al. 2024, as peft computes it): the rows it
covers are rescaled to `m / ||W + scaling * B @ A||` per row (the norm detached, as the paper and peft do).

The native model fuses q/k/v into one `attn.qkv` linear, so one `LoRALinear` may hold several LoRA pairs, each
over a block of output rows ("parts"): the whole layer, or the q, k and v slices. `targets.py` decides which
layers get pairs, `inject.py` puts them into a model, `adapters.py` reads and writes them in peft's format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatune.errors import ConfigError
from qatune.models.fast_ops import make_dropout
from qatune.utils.settings import check_fields, setting

BIAS_MODES = ("none", "all", "lora_only")
LORA_INITS = ("default", "pissa", "olora")  # how A and B start (lora/initial.py: the two that decompose W)
WHOLE = "all"  # part name of a pair that covers every output row of its layer


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters. `targets=None` means the family default (peft's): gpt2 `c_attn`, llama `q`, `v`.

    `bias`: "none" trains no bias, "all" every bias of the model, "lora_only" the biases of adapted layers
    (peft's meanings, so the counts and saved adapters match peft's)."""

    r: int = setting(8, ge=1, help="rank")
    alpha: float = setting(16, gt=0, help="scaling = alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = setting(0.1, ge=0, lt=1)
    targets: list[str] | None = setting(None, help="layer names (q, v, c_attn, all-linear, ...); default: the "
                                        "family's")
    use_rslora: bool = False
    use_dora: bool = setting(False, help="DoRA: a trained magnitude per output row on top of LoRA (peft's use_dora)")
    bias: str = setting("none", choices=BIAS_MODES)
    init: str = setting("default", choices=LORA_INITS,
                        help="default: Kaiming A, zero B; pissa / olora: A, B from the SVD / QR of each base weight, "
                        "which keeps the residual (the result is saved as a plain LoRA of rank 2r, as peft converts)")

    def __post_init__(self) -> None:
        check_fields(self, "lora.")  # the declared types and ranges, also when built in code (adapters.py)
        if self.targets is not None and not self.targets:
            raise ConfigError("LoRA targets is empty; leave it unset for the model family's default")
        if self.use_dora and self.init != "default":
            # The saved PiSSA/OLoRA adapter is converted into a plain LoRA for the original base; DoRA's
            # magnitudes are relative to the residual base's row norms, which that conversion cannot carry.
            raise ConfigError(f"lora.use_dora=true does not combine with lora.init={self.init}: the converted "
                              "adapter would not apply to the original base model")


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
    Dropout is applied once to the input and shared by the pairs of the layer. With `use_dora`,
    `lora_magnitude_vector[part]` is `[rows]`, initialised to the row norms of the base weight (B is zero)."""

    def __init__(self, base: nn.Linear, parts: dict[str, LoRAPart], *, dropout: float, use_rslora: bool,
                 fast_dropout: bool = False, use_dora: bool = False):
        super().__init__()
        self.base = base
        self.parts = dict(sorted(parts.items(), key=lambda kv: kv[1].rows.start))  # in row order: q, k, v
        self.use_rslora = use_rslora
        self.dropout = make_dropout(dropout, fast_dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # PiSSA/OLoRA's starting (A0, B0) per part: the base holds W - scaling * B0 @ A0 (lora/initial.py)
        self.initial: dict[str, tuple[Tensor, Tensor]] = {}
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
        self.use_dora = use_dora
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_factors: dict[str, Tensor] = {}  # m / ||W + sBA|| of each part while merged, for unmerge
        for name in self.parts if use_dora else ():
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name))

    def scaling(self, name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (rslora keeps updates stable as r grows)."""
        part = self.parts[name]
        return part.alpha / (math.sqrt(part.r) if self.use_rslora else part.r)

    def delta_weight(self, name: str) -> Tensor:
        """`scaling * B @ A` for one part: the update to its rows of the base weight, in the LoRA dtype."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling(name)

    def weight_norm(self, name: str) -> Tensor:
        """DoRA's `||W + scaling * B @ A||` of each output row of a part, in the LoRA dtype, detached: the paper
        (section 4.3) and peft treat it as a constant, so no gradient flows through it."""
        delta = self.delta_weight(name).detach()
        rows = self.base.weight[self.parts[name].rows].detach().to(delta.dtype)
        return torch.linalg.norm(rows + delta, dim=1).detach()

    @torch.no_grad()
    def full_magnitude(self) -> Tensor:
        """DoRA's magnitude over every output row, as peft holds it for a whole layer: each part's on its rows,
        and on rows outside every part their base row norm, the magnitude that leaves a row unchanged."""
        dtype = self.lora_A[next(iter(self.parts))].dtype
        magnitude = torch.linalg.norm(self.base.weight.detach().to(dtype), dim=1)
        for name, part in self.parts.items():
            magnitude[part.rows] = self.lora_magnitude_vector[name].detach()
        return magnitude

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x).to(self.lora_A[next(iter(self.parts))].dtype)
        # Out of place: the base output may be a view of a tensor autograd does not track (frozen layer,
        # input without grad), which an in-place add of a tracked delta is not allowed to modify.
        pieces, done = [], 0
        for name, part in self.parts.items():
            lora = (h @ self.lora_A[name].t()) @ self.lora_B[name].t()
            delta = self._dora_delta(name, h, out[..., part.rows], lora) if self.use_dora else lora * self.scaling(name)
            if part.rows.start > done:
                pieces.append(out[..., done:part.rows.start])
            pieces.append(out[..., part.rows] + delta.to(out.dtype))
            done = part.rows.stop
        if done < out.shape[-1]:
            pieces.append(out[..., done:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)  # whole layer: no extra copy

    def _dora_delta(self, name: str, h: Tensor, base_out: Tensor, lora: Tensor) -> Tensor:
        """What DoRA adds to a part's base output, peft's formula: `(m/n - 1) * W x + (m/n) * scaling * B A x`
        with n = ||W + scaling * B @ A|| per row (the bias is not rescaled). `h` is the (dropped-out) LoRA input
        and `lora` = B A h. As in peft, with dropout active the rescaled base term is recomputed from the
        dropped-out input; otherwise it is the layer's own output minus its bias."""
        scale = self.lora_magnitude_vector[name] / self.weight_norm(name)
        rows = self.parts[name].rows
        if self.training and not isinstance(self.dropout, nn.Identity):
            base = F.linear(h, self.base.weight[rows].to(h.dtype))
        else:
            base = base_out if self.base.bias is None else base_out - self.base.bias[rows]
        return (scale - 1) * base + scale * lora * self.scaling(name)

    def _fold(self, name: str, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """A part's rows of the unmerged base weight with its update folded in, in the weight's dtype: W + sBA, or
        for DoRA (m / ||W + sBA||) * (W + sBA) (peft's merge); and DoRA's factor m / ||W + sBA|| ([rows, 1])
        that unmerge divides by (None without DoRA)."""
        delta = self.delta_weight(name)
        if not self.use_dora:
            return rows + delta.to(rows.dtype), None
        factor = (self.lora_magnitude_vector[name] / self.weight_norm(name)).unsqueeze(1)
        return (factor * (rows.to(delta.dtype) + delta)).to(rows.dtype), factor

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA update into the base weight (faster inference); forward then skips the LoRA path."""
        if not self.merged:
            for name, part in self.parts.items():
                folded, factor = self._fold(name, self.base.weight[part.rows])
                self.base.weight[part.rows] = folded
                if factor is not None:
                    self._dora_factors[name] = factor
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what `merge` added: the base weight comes back within float rounding."""
        if self.merged:
            weight = self.base.weight
            for name, part in self.parts.items():
                delta = self.delta_weight(name)
                if self.use_dora:  # the inverse of _fold, with the factor of the weight it was merged into
                    factor = self._dora_factors.pop(name)
                    weight[part.rows] = (weight[part.rows].to(delta.dtype) / factor - delta).to(weight.dtype)
                else:
                    weight[part.rows] -= delta.to(weight.dtype)
            self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The base weight with the LoRA update folded in, as a new tensor (this layer is not modified)."""
        weight = self.base.weight.detach().clone()
        if not self.merged:
            for name, part in self.parts.items():
                weight[part.rows] = self._fold(name, weight[part.rows])[0]
        return weight

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}: rows {p.rows.start}:{p.rows.stop} r={p.r} alpha={p.alpha}"
                          for n, p in self.parts.items())
        return f"{parts}, rslora={self.use_rslora}, dora={self.use_dora}, merged={self.merged}"
