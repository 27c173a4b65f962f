"""`train_model(cfg)`: QA data to a fine-tuned model. A recipe in parts, each readable on its own:

    setup            model (+ LoRA); data -> features; AdamW + schedule; everything checked before anything is
                     written; then (start_run, under the run directory's lock) resume from the newest intact
                     checkpoint, its config compared with this one, or start afresh
    run_epoch        the epoch's batch plan, one optimizer step after another
    train_step       one optimizer step: micro-batches (accumulate, all ranks) -> clip -> step; a non-finite
                     loss or gradient stops the run before the step (divergence)
    validate         validation loss (and generated answers), best tracking, early stopping, checkpoint
    save_checkpoint  trainable weights, optimizer, scheduler, scaler, RNG states and the `TrainState`
    finish           best weights -> result (peft adapter or Hugging Face model) + summary.json

`Recipe` holds what `setup` builds; the loop never reassigns it. `TrainState` is the only thing the loop
changes, and with the tensors it is what a checkpoint holds.

Exact resume: batch order is a pure function of (seed, epoch) and the state holds the data position (epoch,
micro-batch index), so a resumed run sees the same batches, the same dropout masks (RNG states) and logs the
same losses as one that was never stopped.

Data parallel (`torchrun --nproc_per_node N -m qatune train ...`): an optimizer step consumes
`batch_size * grad_accum * world_size` rows; micro-batch i of the step goes to rank i % world. The loss is the
token-sum divided by the step's global label-token count (known from the plan), so the gradient is the same
as one process with the same global batch, whatever the split.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qatune.data.batching import collate_plan, count_tokens, plan_batches, to_device
from qatune.errors import ConfigError, ModelError, TrainingError
from qatune.evaluation.loss import evaluate_loss
from qatune.evaluation.measure import generation_metrics, resolve_task
from qatune.generation.runs import local_model_path
from qatune.lora.inject import count_parameters, format_parameter_count
from qatune.models.loading import build_model as assemble_model
from qatune.models.tokenizer import load_tokenizer
from qatune.publish.model_card import write_model_card
from qatune.runs.layout import RunDir
from qatune.training import checkpoint as ckpt
from qatune.training.build import (
    LossModule,
    TrainingData,
    build_trainable_model,
    pick_device,
    position_limit,
    prepare_data,
    resolve_max_length,
    seed_everything,
)
from qatune.training.config import RunConfig, save_config
from qatune.training.loggers import MetricsLog
from qatune.training.optim import autocast_factory, base_lrs, lr_factor, make_optimizer
from qatune.training.parallel import Dist, Parallel, init_distributed
from qatune.training.result import dir_size, peak_memory, save_result, write_summary
from qatune.training.resume_check import check_resume_config, check_target
from qatune.training.state import TrainState
from qatune.utils.console import ProgressBar
from qatune.utils.lock import DirLock

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    micro_per_step: int  # micro-batches per optimizer step, all ranks together (grad_accum x world)
    steps_per_epoch: int
    total_steps: int


@dataclass
class Recipe:
    """Everything a run is made of, built once by `setup`."""

    cfg: RunConfig
    dist: Dist
    device: torch.device
    out: Path
    tokenizer: Any
    data: TrainingData
    model: nn.Module
    loss_module: nn.Module  # the model's loss, wrapped for DDP / torch.compile
    par: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    plan: StepPlan
    param_counts: tuple[int, int, float]  # trainable, total, percent (counted before FSDP shards the model)
    log: MetricsLog | None
    lock: DirLock | None = None  # the run directory's lock, held by the main process from its first write to the end

    @property
    def run(self) -> RunDir:
        """The layout of `out`: every file name of the run."""
        return RunDir(self.out)

    @property
    def checkpoints(self) -> Path:
        return self.run.checkpoints

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        return epoch_plan(self.cfg, self.data, epoch)


def epoch_plan(cfg: RunConfig, data: TrainingData, epoch: int) -> list[list[list[int]]]:
    """The epoch's batches as feature indices: a pure function of (config, data, epoch), so resume recomputes it."""
    t = cfg.train
    return plan_batches([len(f) for f in data.train], t.batch_size, packing=t.packing,
                        max_length=cfg.data.max_length, shuffle=True, seed=t.seed, epoch=epoch)


def train_model(cfg: RunConfig) -> dict[str, Any]:
    """Run one training job described by `cfg`; returns the summary (also written to `out/summary.json`)."""
    recipe, state = setup(cfg.resolved())
    try:
        progress = ProgressBar("train", recipe.plan.total_steps, done=state.step,
                               enabled=recipe.dist.main and cfg.train.progress)
        with progress:
            while state.step < recipe.plan.total_steps and not state.early_stopped:
                run_epoch(recipe, state, progress)
        state.train_time = state.elapsed()
        return finish(recipe, state)
    finally:
        recipe.log.close()  # a run that failed ends its tracked runs as failed; after finish() a no-op
        if recipe.lock is not None:
            recipe.lock.release()


# ----------------------------------------------------------------------------------------------- setup


def setup(cfg: RunConfig) -> tuple[Recipe, TrainState]:
    """Build every part of the run from a resolved config, and the state to start from (fresh or resumed).

    Everything is checked before the first write: the run directory is locked and written only by `start_run`."""
    t = cfg.train
    d = init_distributed()
    if t.fsdp and d.world > 1 and t.eval_generate:
        raise ConfigError("train.eval_generate needs the whole model on rank 0; it does not combine with "
                          "train.fsdp (evaluate the result with `qatune eval` instead)")
    check_target(cfg)
    device = pick_device(t.device, d)
    if not d.main:  # the one place other ranks are silenced: they would repeat rank 0's messages (errors still show)
        logging.getLogger("qatune").setLevel(logging.ERROR)
    seed_everything(t.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = build_trainable_model(cfg, device)  # before the data: its position limit bounds data.max_length
    max_length = resolve_max_length(cfg.data.max_length, position_limit(model))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=max_length))  # the caller's stays
    data = prepare_data(cfg.data, tokenizer, t.seed)
    logger.info(f"Data: {len(data.train)} train / {len(data.val)} validation examples; {data.report.summary()}")
    param_counts = count_parameters(model)
    logger.info(format_parameter_count(model))
    model.train()
    par = Parallel(d, fsdp=t.fsdp)
    par.shard(model)
    optimizer = make_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, device=device,
                               loraplus_ratio=t.loraplus_ratio)
    loss_module: nn.Module = LossModule(model, t.label_smoothing)
    loss_module = par.wrap(torch.compile(loss_module) if t.compile else loss_module, device)
    plan = _step_plan(cfg, data, d)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        t.schedule, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio, total_steps=plan.total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    out = Path(cfg.out)
    recipe = Recipe(cfg, d, device, out, tokenizer, data, model, loss_module, par, optimizer, scheduler, scaler,
                    autocast_factory(device, t.precision), plan, param_counts, log=None)
    lock = recipe.run.lock() if d.main else None
    try:
        state = start_run(recipe)
        log = _open_log(recipe, state)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return dataclasses.replace(recipe, log=log, lock=lock), state


def _open_log(recipe: Recipe, state: TrainState) -> MetricsLog:
    cfg, t, d = recipe.cfg, recipe.cfg.train, recipe.dist
    log = MetricsLog(recipe.run, d.main, cfg.resume, t.tensorboard, report_to=t.report_to, group=t.run_group)
    log.log_params(cfg.to_dict())
    return log


def _step_plan(cfg: RunConfig, data: TrainingData, d: Dist) -> StepPlan:
    """How many optimizer steps an epoch and the run have (the plan of epoch 0 counts the micro-batches)."""
    t = cfg.train
    group = t.grad_accum * d.world
    micro = len(epoch_plan(cfg, data, 0))
    steps_per_epoch = micro // group
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(data.train)} training examples make fewer micro-batches than one optimizer step "
                          f"needs (batch_size {t.batch_size} x grad_accum {t.grad_accum} x {d.world} processes)")
    if micro - steps_per_epoch * group:
        logger.warning(f"Note: the last {micro - steps_per_epoch * group} micro-batch(es) of each epoch do not fill "
                    "an optimizer step and are skipped (shuffled anew each epoch)")
    total = t.epochs * steps_per_epoch if t.max_steps is None else min(t.max_steps, t.epochs * steps_per_epoch)
    return StepPlan(group, steps_per_epoch, total)


def start_run(r: Recipe) -> TrainState:
    """The run's first writes, under its lock: resume (refused before anything changes when the config may not
    continue the checkpoint) or a fresh start (replacing a previous run only with overwrite=true); then
    config.yaml, and metrics.jsonl cut back to what the resumed checkpoint had seen."""
    if r.dist.main and not r.cfg.overwrite:  # overwrite=true removes links themselves, never their targets
        r.run.refuse_links()
    if r.cfg.resume:
        state, records = resume(r)
    else:
        if r.dist.main:
            check_target(r.cfg)  # again, now that the lock keeps other writers out
            if r.cfg.overwrite:
                r.run.clear()
        state, records = TrainState(), None
    if r.dist.main:
        for name in r.run.remove_interrupted_writes():
            logger.warning(f"Removed {r.out / name}: the temporary copy of a write that was interrupted")
        save_config(r.cfg, r.run.config)
        if not (r.cfg.resume and r.run.base.is_file()):
            r.run.record_base(r.cfg.model, local_model_path(r.cfg.model))
        r.run.repair_metrics(records)
    return state


def resume(r: Recipe) -> tuple[TrainState, int]:
    """Load the newest intact checkpoint into the model, optimizer, scheduler, scaler and RNGs, once its config
    is known to allow it; returns its state and how many metrics records it had seen (a fresh state and 0 when
    there is no checkpoint at all)."""
    found, weights, saved, skipped = ckpt.load_resumable(r.checkpoints)
    for note in skipped:
        logger.warning(f"Skipping damaged checkpoint {note}")
    if found is None:
        if skipped:
            raise ModelError(f"resume=true but no checkpoint in {r.checkpoints} is intact ({'; '.join(skipped)}); "
                             "nothing was changed")
        logger.warning(f"resume=true but no checkpoint in {r.checkpoints}: starting from scratch")
        return TrainState(), 0
    check_resume_config(saved, r.cfg, r.dist.world, found)
    r.par.load_trainable_state(r.model, weights, str(found))
    r.par.load_optimizer_state(r.model, r.optimizer, saved["optimizer"])
    r.scheduler.load_state_dict(saved["scheduler"])
    _apply_schedule(r)
    r.scaler.load_state_dict(saved["scaler"])
    ckpt.set_rng_state(saved["rng"])
    state = TrainState.from_dict(saved["train_state"])
    if r.dist.main:
        for warning in ckpt.relink(r.checkpoints, found, state.best_step):
            logger.warning(warning)
    newest = " (the newest intact checkpoint)" if skipped else ""
    logger.info(f"Resumed from {found}{newest} (step {state.step}, epoch {state.epoch})")
    return state, saved["metrics_records"]


def _apply_schedule(r: Recipe) -> None:
    """The restored scheduler keeps its position; its base rate is the config's train.lr, which a resume may
    change (each group's own share of it: LoRA+). With an unchanged config this recomputes exactly the rates that
    were saved."""
    s = r.scheduler
    s.base_lrs = base_lrs(r.optimizer, r.cfg.train.lr)
    for group, base, factor in zip(r.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(s.last_epoch)


# ------------------------------------------------------------------------------------------ the loop


def run_epoch(r: Recipe, state: TrainState, progress: ProgressBar) -> None:
    """Optimizer steps from the state's data position to the end of the epoch (or of the step budget), with
    the periodic evaluations and checkpoints; then the end-of-epoch evaluation."""
    t, group = r.cfg.train, r.plan.micro_per_step
    plan = r.epoch_plan(state.epoch)
    micro = collate_plan(r.data.train, plan, pad_id=r.data.pad_id, packing=t.packing, skip=state.micro_in_epoch)
    while state.micro_in_epoch + group <= len(plan) and state.step < r.plan.total_steps:
        loss, lr = train_step(r, state, list(itertools.islice(micro, group)))
        log_step(r, state, loss, lr, progress)
        evaluated = _due(t.eval_every, state.step)
        if evaluated and validate(r, state):
            state.early_stopped = True
            return
        # The end-of-epoch evaluation below checkpoints this very step: saving it twice would only widen the
        # window in which a kill leaves the step's directory half replaced.
        last_of_epoch = state.micro_in_epoch + group > len(plan) or state.step >= r.plan.total_steps
        if _due(t.save_every, state.step) and not evaluated and not last_of_epoch:
            save_checkpoint(r, state, best=False)
    # The epoch's batches are used up, or the step budget is. Only a finished epoch moves the data position to
    # the next one, so a run resumed with a larger train.max_steps continues mid-epoch where it stopped.
    if state.micro_in_epoch + group > len(plan):
        state.epoch += 1
        state.micro_in_epoch = 0
    if not _due(t.eval_every, state.step) and validate(r, state):  # unless that just happened at this step
        state.early_stopped = True


def _due(every: int | None, step: int) -> bool:
    return bool(every) and step % every == 0


def train_step(r: Recipe, state: TrainState, step_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """One optimizer step over `step_batches` (every rank's micro-batches; this rank takes its share).
    Returns the step's mean training loss (over all ranks) and the learning rate it used."""
    d = r.dist
    global_tokens = sum(count_tokens(b).label_tokens for b in step_batches)
    mine = step_batches[d.rank::d.world]
    loss_total = torch.zeros((), dtype=torch.float64, device=r.device)  # summed on device: no sync per batch
    for i, batch in enumerate(mine):
        with r.par.sync_context(r.loss_module, r.model, sync=i == len(mine) - 1), r.autocast():
            loss_sum = r.loss_module(to_device(batch, r.device))
            # DDP averages gradients over ranks; scale by world so the result is the global token mean.
            loss = loss_sum * d.world / max(global_tokens, 1)
        r.scaler.scale(loss).backward()
        loss_total += loss_sum.detach()
        state.window_tokens += count_tokens(batch).real_tokens
    if d.world > 1:
        dist.all_reduce(loss_total)
    r.scaler.unscale_(r.optimizer)  # gradients in true units for the norm and clipping (no-op without fp16)
    mean_loss = loss_total.item() / max(global_tokens, 1)
    grad_norm = _grad_norm(r)
    _check_finite(r, state, mean_loss, grad_norm)
    if not math.isfinite(grad_norm):  # only under fp16: the scaler skips this step and lowers its scale
        state.skipped_steps += 1
        logger.warning(f"Step {state.step + 1}: fp16 gradient overflow (norm {grad_norm}); the step is skipped and the "
                    f"loss scale lowered ({state.skipped_steps} skipped so far)")
    r.scaler.step(r.optimizer)
    r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    lr = r.optimizer.param_groups[0]["lr"]
    r.scheduler.step()
    state.step += 1
    state.micro_in_epoch += len(step_batches)
    return mean_loss, lr


def _grad_norm(r: Recipe) -> float:
    """The gradients' global norm, clipped to `train.grad_clip` when set (FSDP: over every shard)."""
    params = [p for p in r.model.parameters() if p.requires_grad]
    if r.cfg.train.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, r.cfg.train.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _check_finite(r: Recipe, state: TrainState, loss: float, grad_norm: float) -> None:
    """A non-finite loss stops the run before the optimizer step, so no NaN reaches the weights, a checkpoint or
    the result. So does a non-finite gradient norm, except under fp16's gradient scaler, whose job is to skip
    such a step and lower its scale (every rank sees the same all-reduced values and stops alike)."""
    if math.isfinite(loss) and (math.isfinite(grad_norm) or r.scaler.is_enabled()):
        return
    r.optimizer.zero_grad(set_to_none=True)
    raise TrainingError(_diverged(r, state.step + 1, f"the training loss is {loss}, the gradient norm {grad_norm}"))


def _diverged(r: Recipe, step: int, what: str) -> str:
    last = ckpt.latest(r.checkpoints)
    if last is not None:
        then = (f"the last good checkpoint is {last} (step {ckpt.step_of(last)}). Lower train.lr (resume=true "
                "continues from that checkpoint with the new rate)")
    else:
        then = ("no checkpoint was written before it. Lower train.lr and start again from step 0 (resume=true or "
                "overwrite=true: there is nothing to continue from)")
    return (f"training diverged at step {step}: {what}. Nothing from that step was saved and no result was "
            f"written; {then}")


def log_step(r: Recipe, state: TrainState, loss: float, lr: float, progress: ProgressBar) -> None:
    """Every `train.log_every` steps (and the last): a `train` record with the tokens/s of the window since."""
    if state.step % r.cfg.train.log_every and state.step != r.plan.total_steps:
        return
    now = time.perf_counter()
    window = state.window_tokens * r.dist.world
    tokens_per_s = window / max(now - state.window_start, 1e-9)
    state.tokens_seen += window
    state.window_tokens, state.window_start = 0, now
    r.log.write({"event": "train", "step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr,
                 "tokens_per_s": tokens_per_s}
                | ({"skipped_steps": state.skipped_steps} if r.scaler.is_enabled() else {}))
    progress.update(state.step, f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s")


# ------------------------------------------------------------------------------ evaluate and checkpoint


def validate(r: Recipe, state: TrainState) -> bool:
    """Validation metrics, best tracking and a checkpoint; returns True when early stopping says stop."""
    t = r.cfg.train
    record = validation_metrics(r, state)
    val_loss = record.get("val_loss")
    if val_loss is not None and not math.isfinite(val_loss):  # never a best, never a checkpoint
        r.log.write(record)
        raise TrainingError(_diverged(r, state.step, f"the validation loss is {val_loss}"))
    improved = state.record_eval(record.get(t.early_stop_metric), higher_is_better=t.early_stop_metric != "val_loss",
                                 min_delta=t.min_delta)
    record["best"] = improved
    r.log.write(record)
    state.history.append({k: v for k, v in record.items() if k != "event"})
    logger.info(_format_eval(record, t.early_stop_metric))
    save_checkpoint(r, state, best=improved)
    return t.patience is not None and state.bad_evals >= t.patience


def validation_metrics(r: Recipe, state: TrainState) -> dict[str, Any]:
    """An `eval` record: validation loss and perplexity, and generation metrics with `train.eval_generate`.
    Every rank gets the same record, so that every rank takes the same early-stopping decision."""
    t, d = r.cfg.train, r.dist
    record: dict[str, Any] = {"event": "eval", "step": state.step, "epoch": state.epoch}
    if r.data.val:
        val_loss = evaluate_loss(r.model, r.data.val, batch_size=t.batch_size, pad_id=r.data.pad_id,
                                 device=r.device, autocast=r.autocast)
        record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
    if t.eval_generate and r.data.val_examples and d.main:
        task = resolve_task("auto", r.cfg.data.format, str(r.cfg.data.train))
        record.update(generation_metrics(r.model, r.tokenizer, r.data.val_examples[: t.eval_generate],
                                         r.data.prompt_format, task))
    if d.world > 1:
        payload = [record]
        dist.broadcast_object_list(payload, src=0)
        record = payload[0]
    return record


def _format_eval(record: dict[str, Any], metric: str) -> str:
    parts = [f"eval step {record['step']}"]
    parts += [f"{k} {record[k]:.4f}" for k in ("val_loss", "val_ppl", "em", "f1", "contains", "bleu") if k in record]
    if record.get("best"):
        parts.append(f"(best {metric})")
    return "  ".join(parts)


def save_checkpoint(r: Recipe, state: TrainState, best: bool) -> None:
    """Everything exact resume needs; `best` also points the `best` link at it. Collective under FSDP."""
    state.train_time = state.elapsed()  # so a resumed run's wall time adds up
    weights = r.par.trainable_state(r.model)
    optimizer = r.par.optimizer_state(r.model, r.optimizer)
    if r.dist.main:
        ckpt.write_checkpoint(r.checkpoints, state.step, weights, {
            "optimizer": optimizer, "scheduler": r.scheduler.state_dict(), "scaler": r.scaler.state_dict(),
            "train_state": state.to_dict(),
            # what a resume checks (the config, the process count) and where it cuts metrics.jsonl back to
            "config": r.cfg.to_dict(), "world_size": r.dist.world,
            "metrics_records": r.run.count_metrics_records(),
            "data_files": ckpt.data_identity(r.cfg.data.train, r.cfg.data.val),  # a resume refuses changed data
        }, best=best, keep=r.cfg.train.keep_checkpoints)
    r.par.barrier()


# ---------------------------------------------------------------------------------------------- finish


def finish(r: Recipe, state: TrainState) -> dict[str, Any]:
    """The result holds the best weights (or the last when nothing was evaluated); summary.json says how the
    run went."""
    best = ckpt.latest(r.checkpoints, "best")
    if best is not None:
        r.par.load_trainable_state(r.model, ckpt.load_weights(best), str(best))
    if not _weights_finite(r):
        raise TrainingError(f"the weights of {best or 'the last step'} are not finite (nan or inf): no result was "
                            "written")
    summary = _summary(r, state)
    result_model = r.model
    if r.par.fsdp:  # gather the shards into one plain model (collective), saved by rank 0
        full = r.par.full_model_state(r.model)
        result_model = assemble_model(r.model.config, full) if r.dist.main else None
    if r.dist.main:
        target = save_result(result_model, r.tokenizer, r.run.result_for(r.cfg.method), method=r.cfg.method,
                             backend=r.cfg.backend, base_model=r.cfg.model)
        summary["result_bytes"] = dir_size(target)
        write_summary(r.run.summary, summary)
        write_model_card(r.out)  # README.md beside the result: Hugging Face model card
        logger.info(f"Done: {state.step} steps, best val loss {summary['best_val_loss']}, result in {r.out}")
    r.log.finish(summary)
    r.par.barrier()
    return summary


def _weights_finite(r: Recipe) -> bool:
    """Whether every trainable weight is finite (each rank checks its shards; all ranks get the same answer)."""
    bad = torch.zeros((), device=r.device)
    for p in r.model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).sum()
    if r.dist.world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


def _epochs_completed(r: Recipe, state: TrainState) -> int:
    """Epochs whose batches are all used. A state checkpointed at an epoch's last step (by its evaluation) has not
    moved on to the next epoch yet; a run resumed from it and finishing at once must count that epoch too."""
    used_up = state.micro_in_epoch + r.plan.micro_per_step > len(r.epoch_plan(state.epoch))
    return state.epoch + int(used_up)


def _summary(r: Recipe, state: TrainState) -> dict[str, Any]:
    trainable, total, percent = r.param_counts
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": percent,
        "steps": state.step,
        "epochs_completed": _epochs_completed(r, state),
        "best_step": state.best_step,
        "best_val_loss": state.best_val_loss(),
        "best_metric": {r.cfg.train.early_stop_metric: state.best_metric},
        "early_stopped": state.early_stopped,
        "skipped_steps": state.skipped_steps,
        "wall_time_s": state.train_time,
        "tokens_per_s": state.tokens_seen / max(state.train_time, 1e-9),
        "peak_memory_bytes": peak_memory(r.device),
        "data": r.data.report.as_dict(),
        "method": r.cfg.method,
        "backend": r.cfg.backend,
        "model": r.cfg.model,
        "world_size": r.dist.world,
    }
