"""Where training metrics go: `metrics.jsonl` always (on the main process), and the experiment trackers named in
`train.report_to` (`tensorboard`, `mlflow`, `wandb`).

The loop calls one object, `MetricsLog`: `log_params(config)` once, `write(record)` for each event, with records
like `{"event": "train", "step": 12, "loss": 1.9, "lr": 4e-4, "tokens_per_s": 812.0}` or
`{"event": "eval", "step": 12, "val_loss": 2.1, ...}`, and `finish(summary)` at the end (summary.json's figures).
Each destination is a `MetricLogger` that turns these into its own format; a tracker is one class here and one
entry in `TRACKERS`. Trackers are optional extras, imported only when a run asks for them. Metric names are
`{event}/{key}` (`train/loss`, `eval/val_loss`) everywhere.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from qatune.errors import ConfigError
from qatune.runs.layout import RunDir
from qatune.utils.io import storage_error


class MetricLogger(Protocol):
    """One destination for a run's metrics."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any] | None) -> None: ...


def numeric_items(record: dict[str, Any]) -> dict[str, float]:
    """`{event}/{key}: value` for a record's numbers (booleans such as `best` count as 0/1, as in TensorBoard)."""
    return {f"{record['event']}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "event") and isinstance(v, (int, float))}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: `{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_figures(summary: dict[str, Any] | None) -> dict[str, float]:
    """summary.json's numbers (nested ones dotted), as final metrics."""
    return {k: float(v) for k, v in flatten(summary or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlLogger:
    """`metrics.jsonl`: one JSON object per event, appended. It cuts nothing itself: before it opens, a resume has
    cut the file back to what the checkpoint had seen (`RunDir.repair_metrics`, the one rule), and a fresh run
    starts without one (a directory holding a run is refused or, with overwrite=true, cleared)."""

    def __init__(self, path: Path):
        self.path = path

    def log_params(self, params: dict[str, Any]) -> None:
        pass  # config.yaml beside it already holds them

    def log(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: one error naming the file (a torn last line is repaired on resume)
            raise storage_error(e, self.path) from e

    def finish(self, summary: dict[str, Any] | None) -> None:
        pass  # summary.json beside it


class TensorBoardLogger:
    """`RUN/tensorboard`: one scalar per number, tagged `{event}/{key}`."""

    def __init__(self, run: RunInfo):
        try:  # optional extra: imported only when a run reports to TensorBoard
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("train.report_to=tensorboard needs tensorboard: pip install 'qatune[tensorboard]'") from e
        self.writer = SummaryWriter(str(run.dir.tensorboard))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in flatten(params).items()))

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in numeric_items(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def finish(self, summary: dict[str, Any] | None) -> None:
        self.writer.close()


class MLflowLogger:
    """An MLflow run in the experiment named by the run group (`qatune compare` sets the sweep's name), else
    `MLFLOW_EXPERIMENT_NAME`, else "qatune". The store is `MLFLOW_TRACKING_URI`, else the local `RUN/mlruns`."""

    def __init__(self, run: RunInfo):
        try:  # optional extra: imported only when a run reports to MLflow
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ConfigError("train.report_to=mlflow needs MLflow: pip install 'qatune[mlflow]'") from e
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = run.dir.mlruns.resolve().as_uri()
            # MLflow 3 keeps its file store only behind this opt-in; a local file store is what needs no
            # server or database here (set MLFLOW_TRACKING_URI for a server or sqlite://).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = run.group or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "qatune"
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = run.previous_id("mlflow")
        if self.run_id is None:
            tags = {"qatune.run_dir": str(run.out.resolve())} | ({"qatune.group": run.group} if run.group else {})
            self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        run.remember_id("mlflow", self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # optional extra, present once __init__ succeeded

        items = [Param(k, str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric  # optional extra, present once __init__ succeeded

        stamp = _now_ms()
        metrics = [Metric(k, v, stamp, record["step"]) for k, v in numeric_items(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any] | None) -> None:
        from mlflow.entities import Metric  # optional extra, present once __init__ succeeded

        stamp, step = _now_ms(), int((summary or {}).get("steps") or 0)
        metrics = [Metric(f"summary/{k}", v, stamp, step) for k, v in summary_figures(summary).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "KILLED")


class WandbLogger:
    """A W&B run (project `WANDB_PROJECT` or "qatune", group = the run group, files under `RUN/wandb`). W&B reads
    its own environment: `WANDB_MODE=offline` works without a network, `wandb sync` uploads later."""

    def __init__(self, run: RunInfo):
        try:  # optional extra: imported only when a run reports to W&B
            import wandb
        except ImportError as e:
            raise ConfigError("train.report_to=wandb needs wandb: pip install 'qatune[wandb]'") from e
        previous = run.previous_id("wandb")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qatune"), group=run.group, name=run.name,
                                  dir=str(run.out), id=previous, resume="allow" if previous else None)
        except wandb.errors.Error as e:  # no login on a machine without a terminal, no network...
            raise ConfigError(f"train.report_to=wandb: W&B could not start a run ({e}); log in with `wandb login` "
                              "or set WANDB_MODE=offline (and `wandb sync` later)") from e
        run.remember_id("wandb", self.run.id)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(numeric_items(record), step=record["step"])

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update({f"summary/{k}": v for k, v in summary_figures(summary).items()})
        self.run.finish(exit_code=0 if summary is not None else 1)


class RunInfo:
    """What trackers need to know about the run: its directory, name, group, and the tracked runs it had."""

    def __init__(self, run: RunDir, group: str | None, resume: bool):
        self.dir, self.out, self.name, self.group = run, run.path, run.path.resolve().name, group
        path = run.trackers  # each tracker's run id, so that a resumed training continues the same tracked run
        self.ids: dict[str, str] = json.loads(path.read_text()) if resume and path.is_file() else {}

    def previous_id(self, tracker: str) -> str | None:
        return self.ids.get(tracker)

    def remember_id(self, tracker: str, run_id: str) -> None:
        self.ids[tracker] = run_id
        self.dir.trackers.write_text(json.dumps(self.ids, indent=2) + "\n")


TRACKERS: dict[str, Callable[[RunInfo], MetricLogger]] = {
    "tensorboard": TensorBoardLogger,
    "mlflow": MLflowLogger,
    "wandb": WandbLogger,
}


def report_targets(report_to: list[str], tensorboard: bool = False) -> list[str]:
    """The trackers of `train.report_to` (checked), with the older `train.tensorboard=true` as an alias."""
    unknown = [name for name in report_to if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown tracker(s) {', '.join(unknown)}; "
                          f"choose among {', '.join(TRACKERS)}")
    names = list(dict.fromkeys(report_to))
    return names + ["tensorboard"] if tensorboard and "tensorboard" not in names else names


class MetricsLog:
    """What the training loop writes to: `metrics.jsonl` plus every tracker asked for, on the main process only
    (`enabled=False` elsewhere: every call is then a no-op)."""

    def __init__(self, run_dir: RunDir, enabled: bool, resume: bool, tensorboard: bool = False, *,
                 report_to: list[str] = (), group: str | None = None):
        self.loggers: list[MetricLogger] = []
        if not enabled:
            return
        self.loggers.append(JsonlLogger(run_dir.metrics))
        run = RunInfo(run_dir, group, resume=resume)
        self.loggers += [TRACKERS[name](run) for name in report_targets(list(report_to), tensorboard)]

    def log_params(self, params: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_params(params)

    def write(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def finish(self, summary: dict[str, Any] | None) -> None:
        """End every tracked run; `summary` (summary.json) becomes its final metrics. None: the run failed."""
        for logger in self.loggers:
            logger.finish(summary)
        self.loggers = []

    def close(self) -> None:
        self.finish(None)


def _now_ms() -> int:
    return int(time.time() * 1000)
