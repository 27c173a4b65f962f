"""Checks for a GPU session (benchmarks/gpu_check.sh): the fast path against the reference over many steps, and
which attention kernels each backend runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from qatune.bench.setups import (
    build_hf,
    build_native,
    make_step,
    native_config,
    random_native_state,
    shape_config,
    sync,
    synthetic_batch,
)
from qatune.data.batching import label_positions
from qatune.training.build import pick_device
from qatune.training.parallel import Dist


def fast_path_agreement(shape: str = "gpt2", methods: tuple[str, ...] = ("full", "lora"), steps: int = 50,
                        batch: int = 8, seq: int = 512, device: str = "auto", precision: str = "bf16",
                        n_layer: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The reference and the fast path trained side by side from the same weights on the same batches (4
    batches cycled, so the loss falls), every dropout off: with dropout the fast path draws other masks, by
    design. Returns the per-step losses and their largest relative gap, per method."""
    dev = pick_device(device, Dist())
    hf_config = {**shape_config(shape, n_layer, seq), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                 "attention_dropout": 0.0}
    state = random_native_state(hf_config, dev, seed)
    data = [synthetic_batch(batch, seq, seed + i, native_config(hf_config).vocab_size) for i in range(4)]
    for b in data:
        b["labels"][:, : seq // 2] = -100  # a prompt half without labels, as answer-only QA
        b.update(label_positions(b["labels"]))
    out: dict[str, Any] = {"max_rel_diff": {}, "shape": shape, "precision": precision, "steps": steps,
                           "device": str(dev), "losses": {}}
    for method in methods:
        losses = {}
        for backend in ("native", "native-fast"):
            model = build_native(hf_config, state, dev, method, fast_path=backend == "native-fast",
                                 precision=precision)
            for module in model.modules():  # LoRA's dropout too
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
            step = make_step(model, backend, method, dev, precision)
            losses[backend] = [float(step(data[i % len(data)])) for i in range(steps)]
            del model, step
        out["max_rel_diff"][method] = max(abs(f - r) / abs(r) for r, f in zip(losses["native"], losses["native-fast"]))
        out["losses"][method] = {"reference": losses["native"], "fast": losses["native-fast"]}
    return out


def sdpa_kernels(device: str = "auto", precision: str = "bf16", seq: int = 512) -> dict[str, Any]:
    """Which attention kernels one training step of each backend runs (gpt2 widths, 2 layers, LoRA, dropout
    as GPT-2: 0.1), from the profiler's op and kernel names; and whether the native step also runs with SDPA
    restricted to the flash backend (which raises if flash cannot serve a call)."""


    dev = pick_device(device, Dist())
    hf_config = shape_config("gpt2", 2, seq)
    state = random_native_state(hf_config, dev, 0)
    batch = synthetic_batch(4, seq, 0, native_config(hf_config).vocab_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    pattern = ("flash", "efficient", "scaled_dot_product", "sdp", "fmha", "attention")
    out: dict[str, Any] = {"device": str(dev), "precision": precision}
    if dev.type == "cuda":
        out["backends_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                   "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                   "math": torch.backends.cuda.math_sdp_enabled(),
                                   "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    for backend, builder in (("native", build_native), ("hf", build_hf)):
        step = make_step(builder(hf_config, state, dev, "lora"), backend, "lora", dev, precision)
        step(batch)
        with profile(activities=activities) as prof:
            step(batch)
            sync(dev)
        out[backend] = sorted({e.key for e in prof.key_averages() if any(p in e.key.lower() for p in pattern)})
        if backend == "native":
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    step(batch)
                    sync(dev)
                out["native_flash_only_step"] = "ok"
            except RuntimeError as e:
                out["native_flash_only_step"] = f"failed: {str(e)[:300]}"
    return out
