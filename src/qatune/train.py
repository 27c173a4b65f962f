"""`train_model(cfg)`: QA data to a fine-tuned model. A recipe to read top to bottom, no framework.

    data -> features -> model (+ LoRA) -> AdamW + schedule -> steps (accumulate, clip, step) ->
    evaluate / early-stop / checkpoint -> result (peft adapter or Hugging Face model) + summary.json

Exact resume: a checkpoint holds the trainable weights, optimizer, scheduler, scaler, RNG states and the
data position (epoch, micro-batch index). Batch order is a pure function of (seed, epoch), so a resumed run
sees the same batches, the same dropout masks and logs the same losses as one that was never stopped.

Data parallel (`torchrun --nproc_per_node N -m qatune train ...`): an optimizer step consumes
`batch_size * grad_accum * world_size` rows; micro-batch i of the step goes to rank i % world. The loss is the
token-sum divided by the step's global label-token count (known from the plan), so the gradient is the same
as one process with the same global batch, whatever the split.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from .batching import PromptTemplate, batches, collate_plan, count_tokens, encode_dataset, plan_batches
from .data import DataReport, QAExample, load_examples, split_train_val
from .errors import QatuneError
from .loading import load_model, parse_dtype
from .lora import LoRAConfig, apply_lora, count_parameters, format_parameter_count
from .parallel import Dist, Parallel, init_distributed
from .run_config import RunConfig, save_config
from .tokenizer import load_tokenizer



# ----------------------------------------------------------------------------------------------- setup


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available() and d.world == 1:
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise QatuneError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig) -> tuple[list[QAExample], list[QAExample], DataReport]:
    """Training and validation examples; validation is split off train when no file is given."""
    d = cfg.data
    report = DataReport()
    kwargs = dict(fmt=d.format, question_field=d.question_field, answer_field=d.answer_field,
                  aliases_field=d.aliases_field, squad_unanswerable=d.squad_unanswerable,
                  skip_invalid=d.skip_invalid)
    train = load_examples(d.train, report=report, **kwargs)
    if d.val:
        val = load_examples(d.val, report=report, **kwargs)
    elif d.val_fraction > 0:
        train, val = split_train_val(train, d.val_fraction, cfg.train.seed)
    else:
        val = []
    if d.max_examples is not None:
        train = train[: d.max_examples]
    if not train:
        raise QatuneError(f"no training examples in {d.train} ({report.summary()})")
    return train, val, report


def build_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The model to train, exposing `loss(batch, reduction)`: native Decoder or transformers (+ peft)."""
    base_dtype = parse_dtype(cfg.train.base_dtype) if cfg.method == "lora" and cfg.train.base_dtype else None
    if cfg.backend == "hf":
        from .hf_backend import HFCausalLM, apply_peft_lora, load_hf_model

        model = load_hf_model(cfg.model, base_dtype or torch.float32, device)
        if cfg.method == "lora":
            model = apply_peft_lora(model, cfg.lora)
        wrapped = HFCausalLM(model)
        return wrapped
    model = load_model(cfg.model, dtype=base_dtype, device=device)
    if cfg.method == "lora":
        lora = cfg.lora
        apply_lora(model, LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets,
                                     use_rslora=lora.use_rslora, bias=lora.bias))
        for p in model.parameters():  # LoRA weights and their optimizer state stay fp32 under a low-precision base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    return model.set_fast_path(cfg.train.fast_path)  # after LoRA, so LoRA's dropout is switched too


def make_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, norms or embeddings' 1-D params); fused on CUDA."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda")


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Linear warm-up to lr, then cosine / linear decay to `min_lr_ratio * lr`, or constant."""
    t = cfg.train
    warm, floor = t.warmup_steps, t.min_lr_ratio

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return factor


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this epoch already consumed (all ranks together)
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    early_stopped: bool = False
    tokens_seen: int = 0
    train_time: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per event. On resume, events after the checkpoint are dropped so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: bool):
        self.path, self.enabled = path, enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise QatuneError("train.tensorboard=true needs tensorboard: pip install 'qatune[tensorboard]'") from e
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "event") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # Right padding never changes earlier tokens under a causal mask, so unpacked training batches drop the
    # attention mask and keep SDPA on its fused causal path.
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if not (k == "attention_mask" and "doc_ids" not in batch)}


def evaluate_loss(model: nn.Module, features, cfg: RunConfig, pad_id: int, device: torch.device,
                  autocast) -> float:
    """Token-weighted mean validation loss (the same quantity the training loss estimates)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), autocast():
        for batch in batches(features, cfg.train.batch_size, pad_id=pad_id, shuffle=False):
            loss_sum, count = model.loss(_to_device(batch, device), reduction="sum")
            total, n = total + float(loss_sum), n + count
    model.train(was_training)
    return total / max(n, 1)


def train_model(cfg: RunConfig) -> dict[str, Any]:
    """Run one training job described by `cfg`; returns the summary (also written to `out/summary.json`)."""
    cfg.resolve_defaults()
    d = init_distributed()
    device = pick_device(cfg.train.device, d)
    out = Path(cfg.out)
    console = _console(d.main)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.train.seed)
    t = cfg.train

    # --- data
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    train_ex, val_ex, report = load_data(cfg)
    template = PromptTemplate(cfg.data.template)
    train_feats = encode_dataset(tokenizer, train_ex, template, cfg.data.max_length, cfg.data.answer_only, report)
    val_feats = encode_dataset(tokenizer, val_ex, template, cfg.data.max_length, cfg.data.answer_only, report)
    console(f"Data: {len(train_feats)} train / {len(val_feats)} validation examples; {report.summary()}")
    pad_id = tokenizer.pad_token_id

    # --- model and optimizer
    if t.fsdp and (cfg.method != "full" or cfg.backend != "native"):
        raise QatuneError("train.fsdp=true is for method=full with backend=native (LoRA's base is frozen: use DDP)")
    if t.fsdp and d.world > 1 and t.eval_generate:
        raise QatuneError("train.eval_generate needs the whole model on rank 0; it does not combine with train.fsdp "
                          "(evaluate the result with `qatune eval` instead)")
    model = build_model(cfg, device)
    trainable, total, percent = count_parameters(model)
    console(format_parameter_count(model))
    model.train()
    par = Parallel(d, fsdp=t.fsdp)
    par.shard(model)
    optimizer = make_optimizer(model, cfg, device)
    loss_module: nn.Module = _LossModule(model, t.label_smoothing)
    if t.compile:
        loss_module = torch.compile(loss_module)
    loss_module = par.wrap(loss_module, device)

    lengths = [len(f) for f in train_feats]
    group = t.grad_accum * d.world  # micro-batches per optimizer step, all ranks together

    def epoch_plan(epoch: int) -> list[list[list[int]]]:
        return plan_batches(lengths, t.batch_size, packing=t.packing, max_length=cfg.data.max_length,
                            shuffle=True, seed=t.seed, epoch=epoch)

    first_plan_len = len(epoch_plan(0))
    steps_per_epoch = first_plan_len // group
    if steps_per_epoch == 0:
        raise QatuneError(f"{len(train_feats)} training examples make fewer micro-batches than one optimizer step "
                          f"needs (batch_size {t.batch_size} x grad_accum {t.grad_accum} x {d.world} processes)")
    dropped = first_plan_len - steps_per_epoch * group
    if dropped:
        console(f"Note: the last {dropped} micro-batch(es) of each epoch do not fill an optimizer step and are "
                "skipped (shuffled anew each epoch)")
    total_steps = t.epochs * steps_per_epoch if t.max_steps is None else min(t.max_steps, t.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    # --- resume
    state = TrainState()
    ckpt_root = out / "checkpoints"
    resume_from = ckpt.latest(ckpt_root) if cfg.resume else None
    if cfg.resume and resume_from is None:
        console(f"resume=true but no checkpoint in {ckpt_root}: starting from scratch")
    if resume_from is not None:
        weights, saved = ckpt.load_checkpoint(resume_from)
        par.load_trainable_state(model, weights, str(resume_from))
        par.load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["train_state"])
        ckpt.set_rng_state(saved["rng"])
        console(f"Resumed from {resume_from} (step {state.step}, epoch {state.epoch})")
    log = MetricsLog(out / "metrics.jsonl", d.main, state.step if resume_from else None, t.tensorboard)
    higher_is_better = t.early_stop_metric != "val_loss"

    def save(best: bool) -> None:
        state.train_time = time_before + time.perf_counter() - start  # so a resumed run's wall time adds up
        weights, optim_state = par.trainable_state(model), par.optimizer_state(model, optimizer)  # collective
        if d.main:
            ckpt.save_checkpoint(ckpt_root, state.step, weights, {
                "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "train_state": state.__dict__.copy(),
            }, best=best, keep=t.keep_checkpoints)
        par.barrier()

    def run_eval() -> bool:
        """Evaluate, track the best, checkpoint; returns True when early stopping says stop."""
        record: dict[str, Any] = {"event": "eval", "step": state.step, "epoch": state.epoch}
        if val_feats:
            val_loss = evaluate_loss(model, val_feats, cfg, pad_id, device, autocast)
            record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
        if t.eval_generate and val_ex and d.main:
            from .evaluate import generation_metrics, resolve_task

            task = resolve_task("auto", cfg.data.format, str(cfg.data.train))
            record.update(generation_metrics(model, tokenizer, val_ex[: t.eval_generate], template, task))
        if d.world > 1:  # every rank needs the metric for the same early-stopping decision
            payload = [record]
            dist.broadcast_object_list(payload, src=0)
            record = payload[0]
        metric = record.get(t.early_stop_metric)
        improved = metric is not None and (
            state.best_metric is None
            or (metric > state.best_metric + t.min_delta if higher_is_better else metric < state.best_metric - t.min_delta))
        if improved:
            state.best_metric, state.best_step, state.bad_evals = metric, state.step, 0
        elif metric is not None:
            state.bad_evals += 1
        record["best"] = improved
        log.write(record)
        state.history.append({k: v for k, v in record.items() if k != "event"})
        console(_format_eval(record, t.early_stop_metric))
        stop = t.patience is not None and state.bad_evals >= t.patience
        save(best=improved)
        return stop

    # --- train
    progress = _Progress(d.main and t.progress, total_steps, state.step)
    start, time_before = time.perf_counter(), state.train_time
    window_tokens, window_start = 0, time.perf_counter()
    while state.step < total_steps and not state.early_stopped:
        plan = epoch_plan(state.epoch)
        micro = collate_plan(train_feats, plan, pad_id=pad_id, packing=t.packing, skip=state.micro_in_epoch)
        while state.micro_in_epoch + group <= len(plan) and state.step < total_steps:
            step_batches = list(itertools.islice(micro, group))
            global_tokens = sum(count_tokens(b).label_tokens for b in step_batches)
            mine = step_batches[d.rank::d.world]
            loss_total = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per batch
            for i, batch in enumerate(mine):
                with par.sync_context(loss_module, model, sync=i == len(mine) - 1), autocast():
                    loss_sum, _ = loss_module(_to_device(batch, device))
                    # DDP averages gradients over ranks; scale by world so the result is the global token mean.
                    loss = loss_sum * d.world / max(global_tokens, 1)
                scaler.scale(loss).backward()
                loss_total += loss_sum.detach()
                window_tokens += count_tokens(batch).real_tokens
            if d.world > 1:
                dist.all_reduce(loss_total)
            if t.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step += 1
            state.micro_in_epoch += group
            train_loss = loss_total.item() / max(global_tokens, 1)
            if state.step % t.log_every == 0 or state.step == total_steps:
                now = time.perf_counter()
                tps = window_tokens * d.world / max(now - window_start, 1e-9)
                state.tokens_seen += window_tokens * d.world
                window_tokens, window_start = 0, now
                log.write({"event": "train", "step": state.step, "epoch": state.epoch, "loss": train_loss,
                           "lr": lr, "tokens_per_s": tps})
                progress.update(state.step, train_loss, lr, tps)
            eval_now = t.eval_every and state.step % t.eval_every == 0
            if eval_now and run_eval():
                state.early_stopped = True
                break
            if t.save_every and state.step % t.save_every == 0 and not eval_now:
                save(best=False)
        else:
            # The epoch's batches are used up, or the step budget is: evaluate (this also checkpoints) unless
            # that just happened at this step. Only a finished epoch moves the data position to the next one, so
            # a run resumed with a larger train.max_steps continues mid-epoch where it stopped.
            if state.micro_in_epoch + group > len(plan):
                state.epoch += 1
                state.micro_in_epoch = 0
            if not (t.eval_every and state.step % t.eval_every == 0) and run_eval():
                state.early_stopped = True
    progress.close()
    state.train_time = time_before + time.perf_counter() - start

    # --- result: the best weights (or the last when nothing was evaluated)
    best = ckpt.latest(ckpt_root, "best")
    if best is not None:
        par.load_trainable_state(model, ckpt.load_checkpoint(best)[0], str(best))
    summary = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": percent,
        "steps": state.step,
        "epochs_completed": state.epoch,
        "best_step": state.best_step,
        "best_val_loss": _best_val_loss(state),
        "best_metric": {t.early_stop_metric: state.best_metric},
        "early_stopped": state.early_stopped,
        "wall_time_s": state.train_time,
        "tokens_per_s": state.tokens_seen / max(state.train_time, 1e-9),
        "peak_memory_bytes": _peak_memory(device),
        "data": report.as_dict(),
        "method": cfg.method,
        "backend": cfg.backend,
        "model": cfg.model,
        "world_size": d.world,
    }
    result_model = model
    if par.fsdp:  # gather the shards into one plain model (collective), saved by rank 0
        from .loading import build_model as assemble

        full = par.full_model_state(model)
        result_model = assemble(model.config, full) if d.main else None
    if d.main:
        _save_result(cfg, result_model, tokenizer, out)
        summary["result_bytes"] = _dir_size(out / ("adapter" if cfg.method == "lora" else "model"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        console(f"Done: {state.step} steps, best val loss {summary['best_val_loss']}, result in {out}")
    par.barrier()
    return summary


class _LossModule(nn.Module):
    """forward(batch) -> (summed token loss, label tokens): the unit DDP and torch.compile wrap."""

    def __init__(self, model: nn.Module, label_smoothing: float):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model.loss(batch, reduction="sum", label_smoothing=self.label_smoothing)


def _best_val_loss(state: TrainState) -> float | None:
    losses = [h["val_loss"] for h in state.history if "val_loss" in h]
    return min(losses) if losses else None


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # CPU: the process's peak resident set (Linux reports KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _save_result(cfg: RunConfig, model: nn.Module, tokenizer, out: Path) -> None:
    if cfg.backend == "hf":
        from .hf_backend import save_hf_result

        save_hf_result(model.model, tokenizer, out / ("adapter" if cfg.method == "lora" else "model"), cfg.method)
        return
    from .adapters import save_adapter, save_merged

    if cfg.method == "lora":
        save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model)
        tokenizer.save_pretrained(str(out / "adapter"))
    else:
        save_merged(model, tokenizer, out / "model")


def _format_eval(record: dict[str, Any], metric: str) -> str:
    parts = [f"eval step {record['step']}"]
    for k in ("val_loss", "val_ppl", "em", "f1", "bleu"):
        if k in record:
            parts.append(f"{k} {record[k]:.4f}")
    if record.get("best"):
        parts.append(f"(best {metric})")
    return "  ".join(parts)


def _console(enabled: bool):
    if not enabled:
        return lambda *a, **k: None
    from rich.console import Console

    c = Console(stderr=True)
    return lambda msg: c.print(msg, markup=False, highlight=False)


class _Progress:
    """A rich progress bar with loss, learning rate, tokens/s and ETA (off on non-main ranks)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
