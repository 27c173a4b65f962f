"""Where training metrics go: `metrics.jsonl` always (on the main process), TensorBoard when asked.

The loop calls one object, `MetricsLog.write(record)`, with records like
`{"event": "train", "step": 12, "loss": 1.9, "lr": 4e-4, "tokens_per_s": 812.0}` or
`{"event": "eval", "step": 12, "val_loss": 2.1, ...}`; each destination turns them into its own format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qatune.errors import ConfigError


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
            self.tb = _tensorboard_writer(path.parent / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "event") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(log_dir: Path):
    try:  # optional extra: imported only when train.tensorboard=true
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("train.tensorboard=true needs tensorboard: pip install 'qatune[tensorboard]'") from e
    return SummaryWriter(str(log_dir))
