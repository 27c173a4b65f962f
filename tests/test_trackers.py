"""Experiment trackers (`train.report_to`): a few training steps, read back with each tracker's own reader.

MLflow: its client API on the run's local store (`RUN/mlruns`). W&B: offline mode (no network, no account), the
run's `.wandb` file read with W&B's own `wandb leet inspect --json`. Both must hold the same step/loss/lr/val_loss
values as metrics.jsonl, the resolved config as parameters and summary.json's figures as final metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qatune.errors import ConfigError
from qatune.training.config import load_config
from qatune.training.recipe import train_model


def _train(model_dir: Path, out: Path, *extra: str) -> dict:
    return train_model(load_config(None, [f"model={model_dir}", "method=lora", "data.train=sample",
                                          "train.max_steps=4", "train.eval_every=2", "train.batch_size=4",
                                          "train.progress=false", f"out={out}", *extra]))


def _jsonl(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {"train/loss": [(step, value), ...], ...} for the values every tracker must hold."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for key in ("loss", "lr", "val_loss"):
            if key in record:
                series.setdefault(f"{record['event']}/{key}", []).append((record["step"], record[key]))
    assert set(series) == {"train/loss", "train/lr", "eval/val_loss"}
    return series


def test_mlflow_local_store_holds_the_metrics_params_and_summary(qa_gpt2_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    summary = _train(qa_gpt2_dir, run_dir, "train.report_to=[mlflow]", "train.run_group=my-sweep")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("my-sweep")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    for name, values in _jsonl(run_dir).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == values, name
    assert run.data.params["train.lr"] == "0.0005" and run.data.params["lora.r"] == "8"
    assert run.data.params["train.run_group"] == "my-sweep"
    assert run.data.metrics["summary/steps"] == summary["steps"] == 4
    assert run.data.metrics["summary/best_val_loss"] == pytest.approx(summary["best_val_loss"])


def test_a_failed_run_ends_its_tracked_run_as_failed(qa_gpt2_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from qatune.errors import TrainingError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="diverged"):
        _train(qa_gpt2_dir, run_dir, "train.report_to=[mlflow]", "train.lr=1e4", "train.max_steps=12",
               "train.run_group=failing")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert "summary/steps" not in run.data.metrics


def _wandb_records(run_dir: Path) -> list[dict]:
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log)], capture_output=True, text=True,
                         check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_offline_run_holds_the_metrics_config_and_summary(qa_gpt2_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "qatune-test")
    run_dir = tmp_path / "run"
    summary = _train(qa_gpt2_dir, run_dir, "train.report_to=wandb", "train.run_group=my-sweep")
    records = _wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert (run["run_group"], run["display_name"], run["project"]) == ("my-sweep", "run", "qatune-test")
    history = [r["history"] for r in records if r["type"] == "history"]
    for name, values in _jsonl(run_dir).items():
        logged = [(h["step"]["num"], h["item"][name]) for h in history if name in h["item"]]
        assert logged == values, name
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    assert config["train"]["lr"] == 0.0005 and config["lora"]["r"] == 8
    final = {}
    for r in records:
        if r["type"] == "summary":
            final.update(r["summary"]["update"])
    assert final["summary/steps"] == summary["steps"] == 4


def test_tensorboard_through_report_to(qa_gpt2_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(qa_gpt2_dir, tmp_path / "run", "train.report_to=tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for name, values in _jsonl(tmp_path / "run").items():
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(name)] == values


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown tracker.*mlfow"):
        load_config(None, ["data.train=sample", "train.report_to=[mlfow]"]).resolved()


def test_compare_groups_a_sweeps_runs_under_its_name(tmp_path):
    from qatune.compare.sweep import load_sweep

    (tmp_path / "s.yaml").write_text("name: my-sweep\nmodels: [gpt2]\nmethods: [lora]\neval: {data: sample-test}\n"
                                     "base: {data: {train: sample}, train: {report_to: [mlflow]}}\n")
    sweep = load_sweep(tmp_path / "s.yaml")
    cfg = sweep.train_config(sweep.candidates()[0], tmp_path / "run")
    assert cfg["train"]["run_group"] == "my-sweep" and cfg["train"]["report_to"] == ["mlflow"]
