"""How the model is spread over processes: one process, DDP (replicas), or FSDP (shards, full fine-tuning).

`torchrun --nproc_per_node N -m qatune train ...` starts N processes. DDP keeps a full replica per process and
all-reduces gradients; FSDP (`train.fsdp=true`, full fine-tuning) shards parameters, gradients and optimizer
state across processes so models that do not fit one device still train. The trainer talks to this class
only, so its loop is the same in all three cases. Checkpoints always hold full (unsharded) weights, which
any mode can read; the optimizer state is saved in the mode's own layout, so resume in the same mode.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from qatune.errors import ModelError
from qatune.training.checkpoint import load_trainable, trainable_state


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


class Parallel:
    def __init__(self, d: Dist, fsdp: bool):
        self.d = d
        self.fsdp = fsdp and d.world > 1
        self.ddp = d.world > 1 and not self.fsdp

    def shard(self, model: nn.Module) -> None:
        """FSDP: shard each block, then the rest (embeddings, final norm, head); call before the optimizer."""
        if not self.fsdp:
            return

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        # The loss calls model.hidden_states(), not forward(): FSDP must gather the root's parameters for it too.
        # The root is not resharded after its forward, so the loss then reads the gathered lm_head.weight.
        register_fsdp_forward_method(model, "hidden_states")

    def wrap(self, loss_module: nn.Module, device: torch.device) -> nn.Module:
        if not self.ddp:
            return loss_module
        return nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_context(self, loss_module: nn.Module, model: nn.Module, sync: bool):
        """Gradient accumulation: only the last micro-batch of a step reduces gradients across processes."""
        if self.ddp and not sync:
            return loss_module.no_sync()
        if self.fsdp:
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # --- full tensors for checkpoints and results (collective calls under FSDP: every rank must call them)

    def _options(self, **kw):

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if not self.fsdp:
            return trainable_state(model)

        full = get_model_state_dict(model, options=self._options())
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {n: t.contiguous() for n, t in full.items() if n in names}

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of the model, unsharded (for saving the result of a full fine-tuning)."""
        if not self.fsdp:
            return model.state_dict()

        return get_model_state_dict(model, options=self._options())

    def load_trainable_state(self, model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
        if not self.fsdp:
            load_trainable(model, weights, where)
            return

        missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise ModelError(f"checkpoint {where} does not fit this model: missing {sorted(missing)[:5]}")
        set_model_state_dict(model, weights, options=self._options(strict=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self.fsdp:
            return optimizer.state_dict()

        return get_optimizer_state_dict(model, optimizer, options=self._options())

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return

        set_optimizer_state_dict(model, optimizer, state, options=self._options())

    def barrier(self) -> None:
        if self.d.world > 1:
            dist.barrier()
