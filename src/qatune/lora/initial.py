"""PiSSA and OLoRA: LoRA pairs that start from a decomposition of the base weight, as peft's `pissa_init` and
`olora_init` compute them, and what follows from it for checkpoints and saved adapters.

Each part of a layer (the whole layer, or a q/k/v row slice of the fused qkv) decomposes its own rows W `[rows, in]`
(fp32, whatever the base dtype):
    PiSSA: W = V S U^T (SVD);  A = sqrt(S_r / scaling) U_r^T,  B = V_r sqrt(S_r / scaling)
    OLoRA: W = Q R (QR);       A = R[:r],                      B = Q[:, :r]
and the base rows become the residual W - scaling * B @ A, so the model computes what it did before. The
starting pair (A0, B0) is kept on the layer (`LoRALinear.initial`): the trained update relative to the ORIGINAL
base is scaling * (B @ A - B0 @ A0), which `plain_pair` writes as one plain LoRA pair of rank 2r exactly as peft's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does, so the saved adapter needs no residual base.

peft decomposes GPT-2's `Conv1D` weight for PiSSA in its `[out, in]` orientation, but for OLoRA takes the stored
`[in, out]` matrix, which gives A and B of the wrong shapes (its forward then fails); qatune decomposes the `[out, in]`
weight for both, which is what peft's OLoRA does for every `nn.Linear` (Llama).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qatune.errors import ConfigError, ModelError
from qatune.lora.layer import LoRALinear

INITIAL_A, INITIAL_B = "lora_A0", "lora_B0"  # checkpoint names: {layer}.lora_A0.{part}


def decompose(weight: Tensor, r: int, scaling: float, method: str) -> tuple[Tensor, Tensor]:
    """(A `[r, in]`, B `[rows, r]`) of `method` for `weight` `[rows, in]` (fp32), with peft's operations."""
    if method == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        s_r = s[:r] / scaling
        return torch.diag(torch.sqrt(s_r)) @ uh[:r], v[:, :r] @ torch.diag(torch.sqrt(s_r))
    if method == "olora":
        q, rr = torch.linalg.qr(weight)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    raise ConfigError(f"lora.init={method!r} does not decompose the base weight")


@torch.no_grad()
def init_from_base(layer: LoRALinear, method: str, name: str) -> None:
    """Set every pair of `layer` from its rows of the base weight and leave the residual in the base."""
    weight = layer.base.weight
    for part_name, part in layer.parts.items():
        rows = weight[part.rows]
        if part.r > min(rows.shape):
            raise ConfigError(f"lora.r={part.r} is above the rank of {name} ({rows.shape[0]}x{rows.shape[1]}), "
                              f"which lora.init={method} decomposes; use lora.r={min(rows.shape)} or less")
        w = rows.to(device="cpu" if weight.device.type == "mps" else weight.device, dtype=torch.float32)
        scaling = layer.scaling(part_name)
        a, b = decompose(w, part.r, scaling, method)
        a_param, b_param = layer.lora_A[part_name], layer.lora_B[part_name]
        a_param.copy_(a)
        b_param.copy_(b)
        layer.initial[part_name] = (a_param.detach().clone(), b_param.detach().clone())
        weight[part.rows] = _residual(w, a_param.to(w), b_param.to(w), scaling).to(weight)


def _residual(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    return weight - scaling * b @ a


def initial_state(layers: dict[str, LoRALinear]) -> dict[str, Tensor]:
    """Every layer's (A0, B0) under checkpoint names, on CPU."""
    state = {}
    for name, layer in layers.items():
        for part_name, (a0, b0) in layer.initial.items():
            state[f"{name}.{INITIAL_A}.{part_name}"] = a0.cpu().contiguous()
            state[f"{name}.{INITIAL_B}.{part_name}"] = b0.cpu().contiguous()
    return state


def is_initial_key(key: str) -> bool:
    return f".{INITIAL_A}." in key or f".{INITIAL_B}." in key


@torch.no_grad()
def restore_initial(layers: dict[str, LoRALinear], saved: dict[str, Tensor], where: str) -> list[str]:
    """Take the checkpoint's (A0, B0) as the layers' own: the residual base is the one the run trained on.

    The decomposition is recomputed when a model is built; on the machine that wrote the checkpoint it gives the
    same tensors, bit for bit, and nothing changes. Elsewhere (another LAPACK) the residual is rebuilt as
    W_res + s * B0' @ A0' - s * B0 @ A0 (within float rounding of the original), and a note says so."""
    want = initial_state(layers)
    missing = sorted(set(want) - set(saved))
    unexpected = sorted(set(saved) - set(want))
    if missing or unexpected:
        raise ModelError(f"checkpoint {where} does not fit this model's LoRA initialisation: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    notes = []
    for name, layer in layers.items():
        lora_a = next(iter(layer.lora_A.values()))  # where and in which dtype the layer's pairs are now
        for part_name, (a_now, b_now) in list(layer.initial.items()):
            a_now, b_now = a_now.to(lora_a), b_now.to(lora_a)
            a0 = saved[f"{name}.{INITIAL_A}.{part_name}"].to(lora_a)
            b0 = saved[f"{name}.{INITIAL_B}.{part_name}"].to(lora_a)
            if a0.shape != a_now.shape or b0.shape != b_now.shape:
                raise ModelError(f"checkpoint {where}: {name}.{INITIAL_A}.{part_name} has shape {tuple(a0.shape)}, "
                                 f"the model needs {tuple(a_now.shape)}")
            if torch.equal(a0, a_now) and torch.equal(b0, b_now):
                continue
            rows, scaling = layer.parts[part_name].rows, layer.scaling(part_name)
            w = layer.base.weight[rows].float()
            original = w + scaling * b_now.float() @ a_now.float()
            layer.base.weight[rows] = _residual(original, a0.float(), b0.float(), scaling).to(layer.base.weight)
            layer.initial[part_name] = (a0.clone(), b0.clone())
            notes.append(f"{name}.{part_name}")
    if notes:
        return [f"the LoRA initialisation of {where} differs from this machine's decomposition of the base weights "
                f"({', '.join(notes[:4])}{' ...' if len(notes) > 4 else ''}): the residual base was rebuilt from the "
                "checkpoint's, which matches the original run within float rounding"]
    return []


def plain_pair(layer: LoRALinear, part_name: str) -> tuple[Tensor, Tensor, int, float]:
    """(A, B, r, alpha) of one part as a plain LoRA pair on the ORIGINAL base weight.

    A default pair is itself. A PiSSA/OLoRA pair computes scaling * (B @ A - B0 @ A0) on top of the original weight,
    as peft's `subtract_mutated_init`: A' = [A; A0], B' = [B, -B0], rank 2r; the scaling must not change, so
    alpha doubles (alpha/r = 2alpha/2r), or grows by sqrt(2) with rslora (alpha/sqrt(r)), as peft writes it."""
    part = layer.parts[part_name]
    a, b = layer.lora_A[part_name].detach(), layer.lora_B[part_name].detach()
    if part_name not in layer.initial:
        return a, b, part.r, part.alpha
    a0, b0 = layer.initial[part_name]
    alpha = part.alpha * (math.sqrt(2) if layer.use_rslora else 2)
    return torch.cat([a, a0.to(a)], dim=0), torch.cat([b, -b0.to(b)], dim=1), 2 * part.r, alpha


def init_lora_layers(layers: dict[str, LoRALinear], method: str) -> None:
    """`init_from_base` on every wrapped layer (`method` "default" leaves them as built)."""
    if method == "default":
        return
    for name, layer in layers.items():
        init_from_base(layer, method, name)
