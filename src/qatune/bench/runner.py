"""`qatune bench`: training throughput of the native backend against transformers (+ peft), in one process.

Every configuration (shape x method x backend [x data strategy]) is built first, from the same random weights,
warmed up, and then measured in rounds: one step of each configuration per round, so that a change in the
machine's speed during the run (clock, thermal state, other jobs) affects all of them alike. One step is what
`train_model` does per micro-batch: forward under autocast, backward, AdamW step (fused on CUDA), zero_grad.

Backends: `native` (the reference eager path of `models/decoder.py`), `native-fast` (`Decoder(fast_path=True)`,
`models/fast_ops.py`), `native-compile` and `native-fast-compile` (`torch.compile` of the loss module, as
`train.compile=true` with `train.fast_path` false / true), `hf` (transformers `GPT2LMHeadModel` + peft, the
baseline recipe: fp32 weights, bf16 autocast, SDPA) and `hf-compile`. Each `-compile` backend is also compared
with its eager twin (`compile_ratios`), measured side by side in the same rounds.

Reported per configuration: non-padding tokens/s (total tokens / total step time), step time (median, min, max,
raw list), peak memory (CUDA: `max_memory_allocated` during its warm-up, minus what was allocated before it was
built, so other configurations resident in the process do not count; CPU: not measured -- the process RSS cannot
be split between configurations and tracemalloc does not see tensor memory), and MFU.

MFU = achieved model FLOP/s / peak FLOP/s, where peak is a large matmul in the run's precision measured on the
same device at start-up (not the datasheet number), and model FLOPs per token are (PaLM convention, causal
attention counted in full, N = weights of every matmul: the blocks' linears and the LM head):

    full fine-tuning:  6 * N                          (forward 2N, backward 4N)
    LoRA:              4 * N + 6 * N_lora             (frozen weights: forward 2N + input gradients 2N;
                                                       adapters: the full 6 N_lora)
    plus attention:    12 * n_layer * seq * d_model   (QK^T and PV: forward 4 * seq * d_model per layer,
                                                       backward twice that)

DoRA (`--methods dora`: the LoRA adapter with `use_dora`, native against peft's) is counted as LoRA: what DoRA
adds (the row norms of W + s B A each step, and with dropout peft's second product of the adapted weights with
the dropped-out input, which qatune computes alike) is overhead of the method, not model FLOPs.

MFU is given for the synthetic batches only, where every token is labelled; with answer-only labels (real
data) the native backend skips most of the LM head, so "model FLOPs" would no longer be the work done.

Real-data mode (`--real-data FILE`, tokenised with `--tokenizer`): variable-length QA examples, tokenised as
training does (answer-only labels), compared as (a) `pad-to-longest`: every batch padded to the longest example of the
dataset (the reference approach), (b) `dynamic`: padded to the longest of its batch, (c) `packing`: examples
packed into rows of `--seq` tokens (native only). Same model, same batch size; tokens/s counts real tokens.
"""

from __future__ import annotations

import gc
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qatune.bench.setups import (
    LORA,
    BenchConfig,
    attention_flops,
    build_hf,
    build_native,
    gpt2_config,
    make_step,
    matmul_params,
    model_flops_per_token,
    random_native_state,
    real_data_batches,
    row_documents,
    sync,
    synthetic_batch,
)
from qatune.training.build import pick_device
from qatune.training.parallel import Dist
from qatune.utils.env import machine_info

logger = logging.getLogger(__name__)


@dataclass
class Measurement:
    """One configuration: its step function (holding its model and optimizer), its batches, and what was
    measured."""

    name: str
    shape: str
    method: str
    backend: str
    strategy: str | None
    params: dict[str, int] = field(default_factory=dict)
    flops_per_token: float | None = None  # excluding attention, which depends on the row length
    step_fn: Callable[[dict[str, Tensor]], Tensor] | None = None
    batches: Iterator[dict[str, Tensor]] | None = None
    warmup_s: list[float] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    attention_flops: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    error: str | None = None
    skipped: str | None = None


def timed_step(run: Measurement, device: torch.device) -> tuple[float, float, dict[str, Tensor]]:
    batch = next(run.batches)
    sync(device)
    start = time.perf_counter()
    loss = run.step_fn(batch)
    sync(device)
    return time.perf_counter() - start, float(loss), batch


def build_and_warm(run: Measurement, builder: Callable[[], nn.Module], cfg: BenchConfig, device: torch.device,
                   batches: list[dict[str, Tensor]]) -> None:
    """Build the configuration, run its warm-up steps and record its peak memory; failures are recorded in
    the run (an out-of-memory configuration must not end a benchmark of many)."""
    if run.backend.startswith("hf") and run.strategy == "packing":
        run.skipped = "packing needs backend=native (transformers' SDPA path has no document mask)"
        return
    logger.info(f"building {run.name}")
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        model = builder()
        if device.type == "cuda":  # after the build: its transient weight copies are not training memory
            torch.cuda.reset_peak_memory_stats(device)
        frozen, trainable = matmul_params(model)
        run.params = {"total": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "matmul_frozen": frozen, "matmul_trainable": trainable}
        run.flops_per_token = model_flops_per_token(frozen, trainable)
        run.step_fn = make_step(model, run.backend, run.method, device, cfg.precision)
        run.batches = iter(batches)
        for _ in range(cfg.warmup):
            run.warmup_s.append(timed_step(run, device)[0])
        if device.type == "cuda":
            run.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - base
    except Exception as e:  # noqa: BLE001 -- recorded in the results, the other configurations go on
        run.error = f"{type(e).__name__}: {e}"[:500]
        run.step_fn = run.batches = None
        logger.warning(f"  failed: {run.error}")


def measure(runs: list[Measurement], cfg: BenchConfig, device: torch.device, hf_config) -> None:
    """`steps` rounds; in each, one step of every live configuration, in turn."""
    live = [r for r in runs if r.step_fn is not None]
    for round_ in range(cfg.steps):
        for run in live:
            if run.error:
                continue
            try:
                seconds, loss, batch = timed_step(run, device)
            except Exception as e:  # noqa: BLE001
                run.error = f"{type(e).__name__} while measuring: {e}"[:500]
                continue
            run.times_s.append(seconds)
            run.losses.append(loss)
            run.tokens.append(int(batch["attention_mask"].sum()))
            run.attention_flops.append(attention_flops(hf_config, row_documents(batch)))
        logger.info(f"round {round_ + 1}/{cfg.steps} done")


def summarise(run: Measurement, peak_flops: float | None, synthetic: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": run.name, "shape": run.shape, "method": run.method, "backend": run.backend,
        "strategy": run.strategy, "params": run.params, "error": run.error, "skipped": run.skipped,
        "warmup_s": run.warmup_s, "times_s": run.times_s, "tokens": run.tokens, "losses": run.losses,
        "peak_memory_bytes": run.peak_memory_bytes,
    }
    if run.times_s:
        total_time = sum(run.times_s)
        tokens_per_s = sum(run.tokens) / total_time
        out.update(
            tokens_per_s=tokens_per_s,
            step_s={"median": statistics.median(run.times_s), "min": min(run.times_s), "max": max(run.times_s)},
        )
        if synthetic and peak_flops and run.flops_per_token is not None:
            flops = run.flops_per_token * sum(run.tokens) + sum(run.attention_flops)
            out["model_tflops_per_s"] = flops / total_time / 1e12
            out["mfu"] = flops / total_time / peak_flops
    return out


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokens/s of each native backend over each baseline, within one (shape, method, strategy)."""
    out = []
    key = lambda r: (r["shape"], r["method"], r["strategy"])
    for group_key, group in itertools.groupby(sorted(results, key=lambda r: tuple(map(str, key(r)))), key=key):
        group = [r for r in group if r.get("tokens_per_s")]
        for a in (r for r in group if r["backend"].startswith("native")):
            for b in (r for r in group if r["backend"].startswith("hf")):
                out.append({"shape": group_key[0], "method": group_key[1], "strategy": group_key[2],
                            "native": a["backend"], "baseline": b["backend"],
                            "ratio": a["tokens_per_s"] / b["tokens_per_s"]})
    return out


def compile_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokens/s of each `X-compile` backend over its eager `X`, within one (shape, method, strategy)."""
    speed = {(r["shape"], r["method"], r["strategy"], r["backend"]): r["tokens_per_s"] for r in results
             if r.get("tokens_per_s")}
    return [{"shape": shape, "method": method, "strategy": strategy, "compiled": backend,
             "eager": backend.removesuffix("-compile"),
             "ratio": tokens_per_s / speed[(shape, method, strategy, backend.removesuffix("-compile"))]}
            for (shape, method, strategy, backend), tokens_per_s in speed.items()
            if backend.endswith("-compile") and (shape, method, strategy, backend.removesuffix("-compile")) in speed]


def strategy_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real data: tokens/s of each batching strategy over `pad-to-longest`, per (shape, method, backend)."""
    reference = {(r["shape"], r["method"], r["backend"]): r["tokens_per_s"] for r in results
                 if r["strategy"] == "pad-to-longest" and r.get("tokens_per_s")}
    return [{"shape": r["shape"], "method": r["method"], "backend": r["backend"], "strategy": r["strategy"],
             "ratio": r["tokens_per_s"] / reference[(r["shape"], r["method"], r["backend"])]}
            for r in results if r.get("tokens_per_s") and r["strategy"] not in (None, "pad-to-longest")
            and (r["shape"], r["method"], r["backend"]) in reference]


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (best of several): the MFU denominator."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(13 if device.type == "cuda" else 5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2 or device.type != "cuda":  # the first CUDA calls pick kernels
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark described by `cfg`; returns the JSON-ready results."""


    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, Dist())
    machine = machine_info(device)  # at the start: the date and load average of the run's beginning
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    peak = measure_peak_flops(device, dtype)
    logger.info(f"device {device}, measured {cfg.precision} matmul peak {peak / 1e12:.2f} TFLOP/s")
    data_info = None
    if cfg.real_data:
        strategy_batches, data_info = real_data_batches(cfg)
    else:
        strategy_batches = {None: [synthetic_batch(cfg.batch, cfg.seq, cfg.seed)] * (cfg.warmup + cfg.steps)}
    results = []
    # One shape at a time: the largest shapes' configurations would not all fit at once; within a shape
    # every configuration is resident and measured in alternation.
    for shape in cfg.shapes:
        hf_config = gpt2_config(shape, cfg.n_layer, cfg.seq)
        state = random_native_state(hf_config, device, cfg.seed)
        runs = []
        for method, backend, strategy in itertools.product(cfg.methods, cfg.backends, strategy_batches):
            name = "/".join(x for x in (shape, method, backend, strategy) if x)
            run = Measurement(name, shape, method, backend, strategy)
            build_and_warm(run, lambda m=method, b=backend, s=state, h=hf_config: _build(b, h, s, device, m), cfg,
                           device, strategy_batches[strategy])
            if run.error:  # free what the failed configuration allocated (peft models hold reference cycles)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            runs.append(run)
        measure(runs, cfg, device, hf_config)
        results += [summarise(r, peak, cfg.real_data is None) for r in runs]
        del runs, state
        gc.collect()
        torch._dynamo.reset()  # compiled graphs of this shape are not needed again (and count toward limits)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "machine": machine,
        "config": {**cfg.__dict__, "lora": LORA},
        "peak_flops": peak,
        "peak_memory_note": None if device.type == "cuda" else
        "CPU: not measured (process RSS cannot be attributed to one configuration; tracemalloc misses tensors)",
        "real_data": data_info,
        "results": results,
        "ratios": ratios(results),
        "compile_ratios": compile_ratios(results),
        "strategy_ratios": strategy_ratios(results),
    }


def _build(backend: str, hf_config, state: dict[str, Tensor], device: torch.device, method: str) -> nn.Module:
    if backend.startswith("hf"):
        return build_hf(hf_config, state, device, method)
    return build_native(hf_config, state, device, method, fast_path=backend.startswith("native-fast"))
