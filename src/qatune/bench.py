"""`qatune bench`: training throughput of the native backend against transformers (+ peft), in one process.

Every configuration (shape x method x backend [x data strategy]) is built first, from the same random weights,
warmed up, and then measured in rounds: one step of each configuration per round, so that a change in the
machine's speed during the run (clock, thermal state, other jobs) affects all of them alike. One step is what
`train_model` does per micro-batch: forward under autocast, backward, AdamW step (fused on CUDA), zero_grad.

Backends: `native` (the reference eager path of `model.py`), `native-fast` (`Decoder.set_fast_path`),
`native-compile` (`torch.compile` of the loss module, as `train.compile=true`), `hf` (transformers
`GPT2LMHeadModel` + peft, the baseline recipe: fp32 weights, bf16 autocast, SDPA) and `hf-compile`.

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

MFU is given for the synthetic batches only, where every token is labelled; with answer-only labels (real
data) the native backend skips most of the LM head, so "model FLOPs" would no longer be the work done.

Real-data mode (`--real-data triviaqa|e2e|FILE`): variable-length QA examples, tokenised as training does
(answer-only labels), compared as (a) `pad-to-longest`: every batch padded to the longest example of the
dataset (the reference approach), (b) `dynamic`: padded to the longest of its batch, (c) `packing`: examples
packed into rows of `--seq` tokens (native only). Same model, same batch size; tokens/s counts real tokens.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import QatuneError

# Random-initialised GPT-2 shapes. `tiny` exists for tests; it keeps GPT-2's vocabulary so real data fits.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
METHODS = ("full", "lora")
BACKENDS = ("native", "native-fast", "native-compile", "hf", "hf-compile")
STRATEGIES = ("pad-to-longest", "dynamic", "packing")
REAL_DATA = {"triviaqa": "data/triviaqa/triviaqa_sm_sub.jsonl", "e2e": "data/e2e/valid.txt"}
GPT2_VOCAB = 50257
LORA = dict(r=8, alpha=16.0, dropout=0.1, targets=["c_attn"])  # the baseline recipe's adapter


@dataclass
class BenchConfig:
    """What `qatune bench` runs: the product shapes x methods x backends (x strategies with real data)."""

    shapes: list[str] = field(default_factory=lambda: ["gpt2"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    backends: list[str] = field(default_factory=lambda: ["native", "native-fast", "hf"])
    batch: int = 16
    seq: int = 512
    steps: int = 10  # measured steps per configuration
    warmup: int = 2  # unmeasured steps per configuration (compilation, optimizer state, allocator)
    precision: str = "bf16"  # bf16 (autocast, fp32 weights) | fp32
    device: str = "auto"
    n_layer: int | None = None  # override the shapes' depth (quick CPU runs)
    real_data: str | None = None  # triviaqa | e2e | path of a QA file; None = synthetic batches
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    shared: str = "../shared"  # where `data/` and `tokenizers/gpt2` are
    threads: int | None = None  # CPU intra-op threads (torch.set_num_threads)
    seed: int = 0

    def validate(self) -> None:
        for name, values, valid in (("shape", self.shapes, SHAPES), ("method", self.methods, METHODS),
                                    ("backend", self.backends, BACKENDS), ("strategy", self.strategies, STRATEGIES)):
            unknown = [v for v in values if v not in valid]
            if unknown or not values:
                raise QatuneError(f"unknown or missing {name}(s) {unknown}; choose from {', '.join(valid)}")
        if self.precision not in ("bf16", "fp32"):
            raise QatuneError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if min(self.batch, self.seq, self.steps, self.warmup) < 1:
            raise QatuneError("--batch, --seq, --steps and --warmup must be >= 1 (warm-up also measures memory)")


@dataclass
class Run:
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


# ------------------------------------------------------------------------------------------------- models


def gpt2_config(shape: str, n_layer: int | None, seq: int):
    """The transformers `GPT2Config` of a shape (dropout as GPT-2: 0.1 residual, embedding and attention)."""
    from transformers import GPT2Config

    dims = dict(SHAPES[shape])
    if n_layer is not None:
        dims["n_layer"] = n_layer
    return GPT2Config(vocab_size=GPT2_VOCAB, n_positions=max(1024, seq), **dims)


def random_native_state(hf_config, device: torch.device, seed: int) -> dict[str, Tensor]:
    """Random weights (`Decoder.init_weights`) built directly on `device`: the one source of every backend's
    weights for this shape."""
    from .config import from_hf_config
    from .model import Decoder

    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(from_hf_config(hf_config.to_dict()))
    model.init_weights()
    return model.state_dict()


def build_native(hf_config, state: dict[str, Tensor], device: torch.device, method: str) -> nn.Module:
    """A native `Decoder` holding a copy of `state`, with LoRA (r=8, alpha=16, dropout 0.1 on c_attn) for
    method=lora, as `train.build_model` makes it."""
    from .config import from_hf_config
    from .lora import LoRAConfig, apply_lora
    from .model import Decoder

    with torch.device(device):
        model = Decoder(from_hf_config(hf_config.to_dict()))
    model.load_state_dict(state)
    if method == "lora":
        apply_lora(model, LoRAConfig(**LORA))
    return model.train()


def build_hf(hf_config, state: dict[str, Tensor], device: torch.device, method: str) -> nn.Module:
    """transformers' `GPT2LMHeadModel` (SDPA attention) with the same weights, + peft LoRA for method=lora,
    wrapped in `HFCausalLM` (the `backend=hf` loss)."""
    from transformers import GPT2LMHeadModel

    from .config import from_hf_config
    from .hf_backend import HFCausalLM, apply_peft_lora
    from .run_config import LoRASection
    from .weights import native_to_hf

    with torch.device(device):
        model = GPT2LMHeadModel(hf_config)
    missing, unexpected = model.load_state_dict(dict(native_to_hf(state, from_hf_config(hf_config.to_dict()))),
                                                strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to wte
        raise QatuneError(f"weights do not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    if method == "lora":
        model = apply_peft_lora(model, LoRASection(**LORA))
    return HFCausalLM(model).train()


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weights that take part in a matmul: every 2-D parameter (linear / `Conv1D` weights,
    LoRA's A and B, and GPT-2's token embedding, which is tied to the LM head and counts once, as the head)
    except the position embedding, which is only looked up."""
    frozen = trainable = 0
    for name, p in model.named_parameters():  # a tied parameter is listed once
        if p.dim() == 2 and not name.endswith(("pos_embed.weight", "wpe.weight")):
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    return frozen, trainable


def model_flops_per_token(frozen: int, trainable: int) -> float:
    """Training FLOPs per token of the matmul weights (module docstring): 6 per trainable weight, 4 per frozen."""
    return 6.0 * trainable + 4.0 * frozen


def attention_flops(hf_config, row_lengths: list[int]) -> float:
    """12 * n_layer * d_model * length^2 per document (12 * n_layer * seq * d_model per token)."""
    return 12.0 * hf_config.n_layer * hf_config.n_embd * sum(n * n for n in row_lengths)


# --------------------------------------------------------------------------------------------------- data


def synthetic_batch(batch: int, seq: int, seed: int) -> dict[str, Tensor]:
    """Uniform random tokens, every position real and labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, GPT2_VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def real_data_batches(cfg: BenchConfig) -> tuple[dict[str, list[dict[str, Tensor]]], dict[str, Any]]:
    """The first `warmup + steps` batches of each strategy (same shuffled order) and a description of the data."""
    from .batching import PromptTemplate, batches, encode_dataset, padding_efficiency
    from .data import DataReport, load_examples
    from .tokenizer import load_tokenizer

    shared = Path(cfg.shared)
    path = shared / REAL_DATA[cfg.real_data] if cfg.real_data in REAL_DATA else Path(cfg.real_data)
    if not path.is_file():
        raise QatuneError(f"real data {cfg.real_data!r}: {path} not found (set --shared to the shared folder)")
    tokenizer = load_tokenizer(shared / "tokenizers" / "gpt2")
    report = DataReport()
    features = encode_dataset(tokenizer, load_examples(str(path), report=report), PromptTemplate(), cfg.seq,
                              answer_only=True, report=report)
    lengths = [len(f) for f in features]
    longest = max(lengths)
    n = cfg.warmup + cfg.steps
    out: dict[str, list[dict[str, Tensor]]] = {}
    for strategy in cfg.strategies:
        kwargs: dict[str, Any] = dict(pad_id=tokenizer.pad_token_id, shuffle=True, seed=cfg.seed)
        if strategy == "pad-to-longest":
            kwargs["pad_to_multiple_of"] = longest  # every batch as wide as the dataset's longest example
        elif strategy == "packing":
            kwargs.update(packing=True, max_length=cfg.seq)
        plan = list(itertools.islice(batches(features, cfg.batch, **kwargs), n))
        out[strategy] = list(itertools.islice(itertools.cycle(plan), n))
    info = {
        "path": str(path), "examples": len(features), "tokens": sum(lengths),
        "mean_length": sum(lengths) / len(lengths), "longest": longest, "data_report": report.summary(),
        "padding_efficiency": {s: padding_efficiency(b) for s, b in out.items()},
    }
    return out, info


def row_documents(batch: dict[str, Tensor]) -> list[int]:
    """Lengths of the documents of a batch (packed rows hold several), for the attention FLOPs."""
    if "doc_ids" in batch:
        docs = batch["doc_ids"]
        return [int(c) for row in docs for c in torch.unique(row[row >= 0], return_counts=True)[1]]
    return [int(n) for n in batch["attention_mask"].sum(1)]


# ------------------------------------------------------------------------------------------------ running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, backend: str, method: str, device: torch.device, precision: str
              ) -> Callable[[dict[str, Tensor]], Tensor]:
    """One training step as `train_model` runs it (forward under autocast, backward, AdamW, zero_grad);
    returns the (detached) mean loss."""
    from .run_config import RunConfig, TrainSection
    from .train import _LossModule, _to_device, make_optimizer

    # The recipe's learning rates (LoRA 5e-4, full 5e-5); weight decay 0.01 on matrices, as train.py.
    run_cfg = RunConfig(method=method, train=TrainSection(lr=5e-4 if method == "lora" else 5e-5))
    optimizer = make_optimizer(model, run_cfg, device)
    loss_module: nn.Module = _LossModule(model, 0.0)
    if backend.endswith("-compile"):
        loss_module = torch.compile(loss_module)
    if backend == "native-fast":
        model.set_fast_path(True)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(batch: dict[str, Tensor]) -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss_sum, n = loss_module(_to_device(batch, device))
            loss = loss_sum / max(n, 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def timed_step(run: Run, device: torch.device) -> tuple[float, float, dict[str, Tensor]]:
    batch = next(run.batches)
    _sync(device)
    start = time.perf_counter()
    loss = run.step_fn(batch)
    _sync(device)
    return time.perf_counter() - start, float(loss), batch


def build_and_warm(run: Run, builder: Callable[[], nn.Module], cfg: BenchConfig, device: torch.device,
                   batches: list[dict[str, Tensor]], console) -> None:
    """Build the configuration, run its warm-up steps and record its peak memory; failures are recorded in
    the run (an out-of-memory configuration must not end a benchmark of many)."""
    if run.backend.startswith("hf") and run.strategy == "packing":
        run.skipped = "packing needs backend=native (transformers' SDPA path has no document mask)"
        return
    console.print(f"building {run.name}", highlight=False)
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
        console.print(f"  failed: {run.error}", highlight=False)


def measure(runs: list[Run], cfg: BenchConfig, device: torch.device, hf_config, console) -> None:
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
        console.print(f"round {round_ + 1}/{cfg.steps} done", highlight=False)


def summarise(run: Run, peak_flops: float | None, synthetic: bool) -> dict[str, Any]:
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
    key = lambda r: (r["shape"], r["method"], r["strategy"])  # noqa: E731
    for group_key, group in itertools.groupby(sorted(results, key=lambda r: tuple(map(str, key(r)))), key=key):
        group = [r for r in group if r.get("tokens_per_s")]
        for a in (r for r in group if r["backend"].startswith("native")):
            for b in (r for r in group if r["backend"].startswith("hf")):
                out.append({"shape": group_key[0], "method": group_key[1], "strategy": group_key[2],
                            "native": a["backend"], "baseline": b["backend"],
                            "ratio": a["tokens_per_s"] / b["tokens_per_s"]})
    return out


def strategy_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real data: tokens/s of each batching strategy over `pad-to-longest`, per (shape, method, backend)."""
    reference = {(r["shape"], r["method"], r["backend"]): r["tokens_per_s"] for r in results
                 if r["strategy"] == "pad-to-longest" and r.get("tokens_per_s")}
    return [{"shape": r["shape"], "method": r["method"], "backend": r["backend"], "strategy": r["strategy"],
             "ratio": r["tokens_per_s"] / reference[(r["shape"], r["method"], r["backend"])]}
            for r in results if r.get("tokens_per_s") and r["strategy"] not in (None, "pad-to-longest")
            and (r["shape"], r["method"], r["backend"]) in reference]


# ---------------------------------------------------------------------------------------- machine, peak


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (best of several): the MFU denominator."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(13 if device.type == "cuda" else 5):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2 or device.type != "cuda":  # the first CUDA calls pick kernels
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    from . import __version__

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "peft": peft_version, "qatune": __version__},
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}"}
    return info


# ----------------------------------------------------------------------------------- checks for GPU runs


def fast_path_agreement(shape: str = "gpt2", methods: tuple[str, ...] = METHODS, steps: int = 50, batch: int = 8,
                        seq: int = 512, device: str = "auto", precision: str = "bf16", n_layer: int | None = None,
                        seed: int = 0) -> dict[str, Any]:
    """The reference and the fast path trained side by side from the same weights on the same batches (4
    batches cycled, so the loss falls), every dropout off: with dropout the fast path draws other masks, by
    design. Returns the per-step losses and their largest relative gap, per method."""
    from .train import Dist, pick_device

    dev = pick_device(device, Dist())
    hf_config = gpt2_config(shape, n_layer, seq)
    hf_config.resid_pdrop = hf_config.embd_pdrop = hf_config.attn_pdrop = 0.0
    state = random_native_state(hf_config, dev, seed)
    data = [synthetic_batch(batch, seq, seed + i) for i in range(4)]
    for b in data:
        b["labels"][:, : seq // 2] = -100  # a prompt half without labels, as answer-only QA
    out: dict[str, Any] = {"max_rel_diff": {}, "shape": shape, "precision": precision, "steps": steps,
                           "device": str(dev), "losses": {}}
    for method in methods:
        losses = {}
        for backend in ("native", "native-fast"):
            model = build_native(hf_config, state, dev, method)
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
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from .train import Dist, pick_device

    dev = pick_device(device, Dist())
    hf_config = gpt2_config("gpt2", 2, seq)
    state = random_native_state(hf_config, dev, 0)
    batch = synthetic_batch(4, seq, 0)
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
            _sync(dev)
        out[backend] = sorted({e.key for e in prof.key_averages() if any(p in e.key.lower() for p in pattern)})
        if backend == "native":
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    step(batch)
                    _sync(dev)
                out["native_flash_only_step"] = "ok"
            except RuntimeError as e:
                out["native_flash_only_step"] = f"failed: {str(e)[:300]}"
    return out


# ---------------------------------------------------------------------------------------------------- main


def run_bench(cfg: BenchConfig, console=None) -> dict[str, Any]:
    """Run the benchmark described by `cfg`; returns the JSON-ready results."""
    from rich.console import Console

    from .train import Dist, pick_device

    cfg.validate()
    console = console or Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, Dist())
    machine = machine_info(device)  # at the start: the date and load average of the run's beginning
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    peak = measure_peak_flops(device, dtype)
    console.print(f"device {device}, measured {cfg.precision} matmul peak {peak / 1e12:.2f} TFLOP/s", highlight=False)
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
            run = Run(name, shape, method, backend, strategy)
            builder = build_hf if backend.startswith("hf") else build_native
            build_and_warm(run, lambda b=builder, m=method, s=state: b(hf_config, s, device, m), cfg, device,
                           strategy_batches[strategy], console)
            if run.error:  # free what the failed configuration allocated (peft models hold reference cycles)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            runs.append(run)
        measure(runs, cfg, device, hf_config, console)
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
        "strategy_ratios": strategy_ratios(results),
    }


def print_table(report: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title=f"qatune bench -- {report['machine'].get('gpu', {}).get('name') or report['machine']['cpu']}"
                        f", {report['config']['precision']}, batch {report['config']['batch']} x seq "
                        f"{report['config']['seq']}")
    for col in ("shape", "method", "data", "backend", "tokens/s", "step ms (median, min-max)", "peak mem", "MFU",
                "vs hf"):
        table.add_column(col, justify="right" if col in ("tokens/s", "peak mem", "MFU", "vs hf") else "left")
    for r in report["results"]:
        vs = [x for x in report["ratios"] if x["native"] == r["backend"] and x["baseline"] == "hf"
              and (x["shape"], x["method"], x["strategy"]) == (r["shape"], r["method"], r["strategy"])]
        if r.get("step_s"):
            s = r["step_s"]
            timing = f"{s['median'] * 1e3:,.0f} ({s['min'] * 1e3:,.0f}-{s['max'] * 1e3:,.0f})"
        else:
            timing = r["error"] or r["skipped"] or "-"
        table.add_row(
            r["shape"], r["method"], r["strategy"] or "synthetic", r["backend"],
            f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-", timing,
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "-",
            f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
            f"{vs[0]['ratio']:.2f}x" if vs else "",
        )
    console.print(table)


def bench_command(args) -> int:
    """`qatune bench ...` (arguments defined in cli.py)."""
    from rich.console import Console

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    cfg = BenchConfig(shapes=split(args.shapes), methods=split(args.methods), backends=split(args.backends),
                      batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                      precision=args.precision, device=args.device, n_layer=args.n_layer,
                      real_data=args.real_data, strategies=split(args.strategies), shared=args.shared,
                      threads=args.threads, seed=args.seed)
    console = Console(width=None if Console().is_terminal else 200)
    report = run_bench(cfg, console)
    print_table(report, console)
    for r in report["ratios"]:
        console.print(f"{r['shape']}/{r['method']}{'/' + r['strategy'] if r['strategy'] else ''}: "
                      f"{r['native']} / {r['baseline']} = {r['ratio']:.2f}x tokens/s", highlight=False)
    for r in report["strategy_ratios"]:
        console.print(f"{r['shape']}/{r['method']}/{r['backend']}: {r['strategy']} / pad-to-longest = "
                      f"{r['ratio']:.2f}x tokens/s", highlight=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        console.print(f"wrote {args.json}", highlight=False)
    return 0
