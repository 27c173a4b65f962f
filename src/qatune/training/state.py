"""`TrainState`: everything the training loop changes, in one object; what a checkpoint saves besides tensors.

The persisted fields are plain numbers, strings and lists (JSON-compatible), so a checkpoint's state can be
stored without pickling. The clock fields belong to one process's session and are not saved.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

# What early stopping can watch: the validation loss, or a generation metric of `train.eval_generate`.
EARLY_STOP_METRICS = ("val_loss", "em", "f1", "contains", "bleu")
_SESSION = {"persist": False}  # field metadata: this process only, not checkpointed


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this epoch already consumed (all ranks together)
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping's patience counter)
    early_stopped: bool = False
    tokens_seen: int = 0
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped (an inf/NaN gradient lowered its scale)
    train_time: float = 0.0  # seconds of training over every session (a resumed run adds up)
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation record
    # This session's clocks: when it started, the train_time before it, and the current logging window.
    session_start: float = field(default_factory=time.perf_counter, metadata=_SESSION)
    time_before: float = field(default=0.0, metadata=_SESSION)
    window_tokens: int = field(default=0, metadata=_SESSION)
    window_start: float = field(default_factory=time.perf_counter, metadata=_SESSION)

    def to_dict(self) -> dict[str, Any]:
        """The persisted fields (for a checkpoint)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("persist", True)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """The state of a checkpoint, with this session's clocks starting now."""
        persisted = {f.name for f in dataclasses.fields(cls) if f.metadata.get("persist", True)}
        state = cls(**{k: v for k, v in saved.items() if k in persisted})
        state.time_before = state.train_time
        return state

    def elapsed(self) -> float:
        """Training seconds so far, earlier sessions included."""
        return self.time_before + time.perf_counter() - self.session_start

    def record_eval(self, metric: float | None, *, higher_is_better: bool, min_delta: float) -> bool:
        """Track the best value of the early-stopping metric; returns whether `metric` improved on it.

        Neither a missing nor a non-finite value is an improvement. A missing one (nothing measured the metric)
        leaves the patience counter as it is; a non-finite one counts against patience."""
        if metric is None:
            return False
        improved = math.isfinite(metric) and (
            self.best_metric is None
            or (metric > self.best_metric + min_delta if higher_is_better else metric < self.best_metric - min_delta))
        if improved:
            self.best_metric, self.best_step, self.bad_evals = metric, self.step, 0
        else:
            self.bad_evals += 1
        return improved

    def best_val_loss(self) -> float | None:
        losses = [h["val_loss"] for h in self.history if "val_loss" in h and math.isfinite(h["val_loss"])]
        return min(losses) if losses else None
