"""`qatune bench`: training throughput and memory of the native backend against transformers (+ peft).

Every configuration (shape x method x backend [x data strategy]) is built first, from the same weights (seeded
random, or SmolLM2's real ones with `weights="real"`), warmed up, and then measured in rounds: one step of each
configuration per round, so that a change in the machine's speed during the run (clock, thermal state, other
jobs) affects all of them alike. On CPU each configuration runs in a process of its own (`isolated.py`; the
parent still alternates them), so that each one's whole-process peak RSS is known; on CUDA (or with
`isolate=False`) they share this process. One step is what
`train_model` does per micro-batch: forward under autocast, backward, AdamW step (fused on CUDA), zero_grad.

Backends: `native` (the reference eager path of `models/decoder.py`), `native-fast` (`Decoder(fast_path=True)`,
`models/fast_ops.py`), `native-compile` and `native-fast-compile` (`torch.compile` of the loss module, as
`train.compile=true` with `train.fast_path` false / true), `hf` (transformers `GPT2LMHeadModel` + peft, the
baseline recipe: fp32 weights, bf16 autocast, SDPA) and `hf-compile`. Each `-compile` backend is also compared
with its eager twin (`compile_ratios`), measured side by side in the same rounds.

Reported per configuration: non-padding tokens/s (total tokens / total step time), step time (median, min, max,
raw list), peak memory (CUDA: `max_memory_allocated` during its warm-up, minus what was allocated before it was
built, so other configurations resident in the process do not count; CPU: the peak RSS of the configuration's
own process, `peak_rss_bytes`, imports and weight loading included, as for a `qatune train` process), and MFU.

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
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from qatune.bench.isolated import Child, ChildError, answer, peak_rss_bytes
from qatune.bench.setups import (
    LORA,
    REAL_WEIGHTS,
    BenchConfig,
    attention_flops,
    build_hf,
    build_native,
    load_native_real,
    make_step,
    matmul_params,
    model_flops_per_token,
    native_config,
    random_native_state,
    real_data_batches,
    real_native_state,
    row_documents,
    shape_config,
    sync,
    synthetic_batch,
)
from qatune.training.build import pick_device
from qatune.training.parallel import Dist
from qatune.utils.allocator import keep_freed_memory
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
    peak_rss_bytes: int | None = None  # whole child process (`isolated.py`), when each configuration has one
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


def measure(runs: list[Measurement], cfg: BenchConfig, device: torch.device, hf_config: dict[str, Any]) -> None:
    """`steps` rounds; in each, one step of every live configuration, in turn."""
    live = [r for r in runs if r.step_fn is not None]
    for round_ in range(cfg.steps):
        for run in live:
            if run.error:
                continue
            try:
                record_step(run, measured_step(run, device, hf_config))
            except Exception as e:  # noqa: BLE001
                run.error = f"{type(e).__name__} while measuring: {e}"[:500]
        logger.info(f"round {round_ + 1}/{cfg.steps} done")


def measured_step(run: Measurement, device: torch.device, hf_config: dict[str, Any]) -> dict[str, Any]:
    """One timed step and what it counts: seconds, loss, non-padding tokens, attention FLOPs."""
    seconds, loss, batch = timed_step(run, device)
    return {"seconds": seconds, "loss": loss, "tokens": int(batch["attention_mask"].sum()),
            "attention_flops": attention_flops(hf_config, row_documents(batch))}


def record_step(run: Measurement, step: dict[str, Any]) -> None:
    run.times_s.append(step["seconds"])
    run.losses.append(step["loss"])
    run.tokens.append(step["tokens"])
    run.attention_flops.append(step["attention_flops"])


def summarise(run: Measurement, peak_flops: float | None, synthetic: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": run.name, "shape": run.shape, "method": run.method, "backend": run.backend,
        "strategy": run.strategy, "params": run.params, "error": run.error, "skipped": run.skipped,
        "warmup_s": run.warmup_s, "times_s": run.times_s, "tokens": run.tokens, "losses": run.losses,
        "peak_memory_bytes": run.peak_memory_bytes, "peak_rss_bytes": run.peak_rss_bytes,
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
    """tokens/s of each native backend over each baseline, within one (shape, method, strategy); and its peak
    memory over the baseline's (whole-process RSS with one process per configuration, else CUDA's)."""
    out = []
    key = lambda r: (r["shape"], r["method"], r["strategy"])
    for group_key, group in itertools.groupby(sorted(results, key=lambda r: tuple(map(str, key(r)))), key=key):
        group = [r for r in group if r.get("tokens_per_s")]
        for a in (r for r in group if r["backend"].startswith("native")):
            for b in (r for r in group if r["backend"].startswith("hf")):
                memory = next(((a[k] / b[k], k) for k in ("peak_rss_bytes", "peak_memory_bytes")
                               if a.get(k) and b.get(k)), (None, None))
                out.append({"shape": group_key[0], "method": group_key[1], "strategy": group_key[2],
                            "native": a["backend"], "baseline": b["backend"],
                            "ratio": a["tokens_per_s"] / b["tokens_per_s"],
                            "memory_ratio": memory[0], "memory_measure": memory[1]})
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
    isolate = cfg.isolate if cfg.isolate is not None else device.type == "cpu"
    machine = machine_info(device)  # at the start: the date and load average of the run's beginning
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    peak = measure_peak_flops(device, dtype)
    logger.info(f"device {device}, measured {cfg.precision} matmul peak {peak / 1e12:.2f} TFLOP/s")
    data_info = real_data_batches(cfg)[1] if cfg.real_data else None
    results = []
    # One shape at a time: the largest shapes' configurations would not all fit at once; within a shape
    # every configuration is resident and measured in alternation.
    for shape in cfg.shapes:
        hf_config = shape_config(shape, cfg.n_layer, cfg.seq, cfg.weights)
        runs = [Measurement("/".join(x for x in (shape, method, backend, strategy) if x), shape, method, backend,
                            strategy)
                for method, backend, strategy in itertools.product(cfg.methods, cfg.backends, _strategies(cfg))]
        if isolate:  # one method at a time: its backends alternate, and fewer processes are resident at once
            for method in cfg.methods:
                measure_in_processes([r for r in runs if r.method == method], cfg, hf_config)
        else:
            measure_in_process(runs, cfg, device, hf_config)
        results += [summarise(r, peak, cfg.real_data is None) for r in runs]
    return {
        "machine": machine,
        "config": {**cfg.__dict__, "isolate": isolate, "lora": LORA},
        "peak_flops": peak,
        "peak_memory_note": "CPU: whole-process peak RSS (VmHWM) of each configuration's own process "
        "(peak_rss_bytes)" if isolate else "CUDA: max_memory_allocated during warm-up (peak_memory_bytes)"
        if device.type == "cuda" else "CPU, one process: not measured (process RSS cannot be attributed to one "
        "configuration; tracemalloc misses tensors)",
        "real_data": data_info,
        "results": results,
        "ratios": ratios(results),
        "compile_ratios": compile_ratios(results),
        "strategy_ratios": strategy_ratios(results),
    }


def _strategies(cfg: BenchConfig) -> list[str | None]:
    return list(cfg.strategies) if cfg.real_data else [None]


def bench_batches(cfg: BenchConfig, hf_config: dict[str, Any]) -> dict[str | None, list[dict[str, Tensor]]]:
    """The batches of every strategy (real data), or the one synthetic batch repeated."""
    if cfg.real_data:
        return real_data_batches(cfg)[0]
    batch = synthetic_batch(cfg.batch, cfg.seq, cfg.seed, native_config(hf_config).vocab_size)
    return {None: [batch] * (cfg.warmup + cfg.steps)}


def measure_in_process(runs: list[Measurement], cfg: BenchConfig, device: torch.device,
                       hf_config: dict[str, Any]) -> None:
    """Every configuration built in this process (each from its own copy of one weight set), then measured."""
    strategy_batches = bench_batches(cfg, hf_config)
    state = (real_native_state(runs[0].shape, device) if cfg.weights == "real"
             else random_native_state(hf_config, device, cfg.seed))
    for run in runs:
        build_and_warm(run, lambda r=run, s=state: _build(r, cfg, hf_config, s, device, copy=True), cfg, device,
                       strategy_batches[run.strategy])
        if run.error:  # free what the failed configuration allocated (peft models hold reference cycles)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    measure(runs, cfg, device, hf_config)
    for run in runs:
        run.step_fn = run.batches = None
    del state
    gc.collect()
    torch._dynamo.reset()  # compiled graphs of this shape are not needed again (and count toward limits)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_in_processes(runs: list[Measurement], cfg: BenchConfig, hf_config: dict[str, Any]) -> None:
    """Each configuration in its own process (`isolated.py`), built one after the other, then measured in
    alternation: one step of each per round; at the end each reports its peak RSS."""
    children: list[tuple[Measurement, Child]] = []
    try:
        for run in runs:
            logger.info(f"starting {run.name} in its own process")
            child = Child({"name": run.name, "shape": run.shape, "method": run.method, "backend": run.backend,
                           "strategy": run.strategy, "config": cfg.__dict__})
            children.append((run, child))
            try:
                ready = child.start()
            except ChildError as e:
                run.error = str(e)
                continue
            for key in ("params", "flops_per_token", "warmup_s", "error", "skipped"):
                setattr(run, key, ready[key])
        for round_ in range(cfg.steps):
            for run, child in children:
                if run.error is None and run.skipped is None:
                    _child_step(run, child)
            logger.info(f"round {round_ + 1}/{cfg.steps} done")
        for run, child in children:
            if child.process.poll() is None:
                run.peak_rss_bytes = child.request({"op": "stop"}).get("peak_rss_bytes")
    finally:
        for _, child in children:
            child.close()


def _child_step(run: Measurement, child: Child) -> None:
    try:
        step = child.request({"op": "step"})
    except ChildError as e:
        run.error = str(e)
        return
    if step.get("error"):
        run.error = step["error"]
    else:
        record_step(run, step)


def child_main(requests: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """A configuration's own process (`python -m qatune.bench.runner`, started by `isolated.Child`): build and
    warm up what the first request describes, then one measured step per `step` request; `stop` answers the
    process's peak RSS."""
    spec = json.loads(requests.readline())
    keep_freed_memory()  # as `qatune train` does, whatever the backend
    cfg = BenchConfig(**spec["config"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, Dist())
    hf_config = shape_config(spec["shape"], cfg.n_layer, cfg.seq, cfg.weights)
    run = Measurement(spec["name"], spec["shape"], spec["method"], spec["backend"], spec["strategy"])
    batches = bench_batches(cfg, hf_config)[run.strategy]
    build_and_warm(run, lambda: _build(run, cfg, hf_config, None, device, copy=False), cfg, device, batches)
    answer(out, {"params": run.params, "flops_per_token": run.flops_per_token, "warmup_s": run.warmup_s,
                 "error": run.error, "skipped": run.skipped})
    for line in requests:
        request = json.loads(line)
        if request["op"] == "stop":
            answer(out, {"peak_rss_bytes": peak_rss_bytes()})
            return
        try:
            answer(out, measured_step(run, device, hf_config))
        except Exception as e:  # noqa: BLE001 -- recorded in the results, the other configurations go on
            answer(out, {"error": f"{type(e).__name__} while measuring: {e}"[:500]})


def _build(run: Measurement, cfg: BenchConfig, hf_config: dict[str, Any], state: dict[str, Tensor] | None,
           device: torch.device, copy: bool) -> nn.Module:
    """The configuration's model from `state` (copied with `copy`), or from its own weights when `state` is
    None (a child process: the seeded random weights, or the real ones, which the hf backend loads through
    transformers as `qatune train backend=hf` does)."""
    real = cfg.weights == "real"
    fast_path = run.backend.startswith("native-fast")
    if real and state is None:
        if run.backend.startswith("hf"):
            return build_hf(hf_config, None, device, run.method, source=REAL_WEIGHTS[run.shape])
        return load_native_real(run.shape, device, run.method, fast_path, cfg.precision)
    if state is None:
        state = real_native_state(run.shape, device) if real else random_native_state(hf_config, device, cfg.seed)
    if run.backend.startswith("hf"):
        return build_hf(hf_config, state, device, run.method, copy=copy)
    return build_native(hf_config, state, device, run.method, fast_path=fast_path, precision=cfg.precision,
                        copy=copy)


if __name__ == "__main__":
    child_main()
