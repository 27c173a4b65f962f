"""The optimizer, the learning-rate schedule and the numeric precision of a training run."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each


LORAPLUS_LR_EMBEDDING = 1e-6  # peft's `loraplus_lr_embedding` default: the lr of LoRA embedding pairs, fixed


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, device: torch.device,
                   loraplus_ratio: float | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, norms or embeddings' 1-D params); fused on CUDA and
    CPU (on CPU the fused kernel steps 135M fp32 parameters about 4x faster than the default foreach one).
    With `loraplus_ratio`, LoRA+'s groups (`loraplus_groups`). Each group's `lr_ratio` (or `fixed_lr`) says how
    its base rate follows `lr` (`base_lrs`)."""
    if loraplus_ratio is not None:
        groups = loraplus_groups(model, lr=lr, ratio=loraplus_ratio, weight_decay=weight_decay)
    else:
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def loraplus_groups(model: nn.Module, *, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """peft's `create_loraplus_optimizer` groups, in its order, with `loraplus_weight_decay=weight_decay`:
    A (lr, decay), LoRA embedding pairs (1e-6, decay), B and other 1-D parameters (ratio x lr, decay), and the
    biases among them (ratio x lr, no decay). peft tells them apart by name (`lora_B`, `bias`; `lora_embedding_A/B`
    are what its LoRA embedding layer holds). peft also keeps LayerNorm weights from decay, but those never train
    with LoRA here (only LoRA pairs and biases do), so that rule has nothing to sort."""
    a, embedding, b, b_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_embedding_" in name:
            embedding.append(p)
        elif "lora_B" in name or p.ndim == 1:
            (b_no_decay if "bias" in name else b).append(p)
        else:
            a.append(p)
    return [{"params": a, "weight_decay": weight_decay, "lr": lr, "lr_ratio": 1.0},
            {"params": embedding, "weight_decay": weight_decay, "lr": LORAPLUS_LR_EMBEDDING,
             "fixed_lr": LORAPLUS_LR_EMBEDDING},
            {"params": b, "weight_decay": weight_decay, "lr": lr * ratio, "lr_ratio": ratio},
            {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * ratio, "lr_ratio": ratio}]


def base_lrs(optimizer: torch.optim.Optimizer, lr: float) -> list[float]:
    """Each group's base learning rate for `lr` (the one the schedule multiplies): LoRA+'s B groups ratio x lr, its
    embedding group fixed, every other group `lr`."""
    return [g["fixed_lr"] if "fixed_lr" in g else lr * g.get("lr_ratio", 1.0) for g in optimizer.param_groups]


def lr_factor(schedule: str, *, warmup_steps: int, min_lr_ratio: float, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each step: linear warm-up to 1, then cosine / linear decay to
    `min_lr_ratio`, or constant."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return factor


def autocast_factory(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """A function making the autocast context of `precision` (fp32: a context that does nothing)."""
    dtype = PRECISIONS[precision]
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
