"""The rows of a report: a baseline or a (method, rank) configuration, with its runs over seeds and their
per-item scores."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qatune.compare.sweep import METHOD_LABELS, METHODS, trains_lora

# The per-item score each task's comparisons use, and its label; multiple choice uses acc_norm.
MAIN_SCORE = {"qa": ("f1", "F1"), "nlg": ("bleu", "sentence BLEU"), "mc": ("acc_norm", "acc_norm")}
SECOND_SCORE = {"qa": ("em", "EM"), "nlg": ("rouge_l", "ROUGE-L"), "mc": ("acc", "acc")}


def params_text(n: float | None) -> str:
    """A parameter count as the report writes it: 134.5M, 461K."""
    return "-" if n is None else (f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K")


@dataclass
class ReportRow:
    """One row of the report: a baseline, or a (method, rank) configuration's runs over seeds."""

    method: str
    rank: int | None
    rows: list[dict[str, Any]]
    shots: int = 0
    prompt_format: str | None = None  # a baseline's; a trained row's is in its runs' points or base config
    scores: dict[tuple[str, str], np.ndarray | None] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        if trains_lora(self.method):
            rank = self.rank if self.rank is not None else self.rows[0]["point"].get("lora.r")
            return f"{METHOD_LABELS[self.method]} r={rank}"
        name = f"{self.shots}-shot" if self.method == "k-shot" else self.method
        return f"{name}, {self.prompt_format}" if self.prompt_format else name

    @property
    def trained(self) -> bool:
        return self.method in METHODS

    def matrix(self, dataset: str, key: str) -> np.ndarray | None:
        """Per-item scores `[seeds, items]` on a dataset (None when this row was not scored on it)."""
        if (dataset, key) not in self.scores:
            found = [row.get("item_scores", {}).get(dataset, {}).get(key) for row in self.rows]
            self.scores[(dataset, key)] = np.asarray(found, dtype=float) if all(found) else None
        return self.scores[(dataset, key)]

    def mean(self, field_name: str) -> float | None:
        values = [row.get(field_name) for row in self.rows if row.get(field_name) is not None]
        return statistics.fmean(values) if values else None


def bar_row(configs: list[ReportRow], task: str) -> ReportRow | None:
    """The baseline a fine-tune must clear: the untrained row (zero- or k-shot, in any prompt format) with the
    best validation score, chosen before any test score is read; zero-shot where no baseline was scored on
    validation (a sweep from before baselines were)."""
    key = MAIN_SCORE[task][0]
    scored = [c for c in configs if not c.trained and validation_score(c, key) is not None]
    if scored:
        return max(scored, key=lambda c: validation_score(c, key))
    return next((c for c in configs if c.method == "zero-shot"), None)


def base_row(configs: list[ReportRow], task: str) -> ReportRow | None:
    """The base model for generalisation and forgetting: zero-shot, in the bar's prompt format where it has one."""
    bar = bar_row(configs, task)
    zero = [c for c in configs if c.method == "zero-shot"]
    same = [c for c in zero if bar is not None and c.prompt_format == bar.prompt_format]
    return (same or zero or [None])[0]


def validation_score(c: ReportRow, key: str) -> float | None:
    """The mean over seeds of a row's validation score `key` (None where it was not measured)."""
    found = [row.get("validation", {}).get(key) for row in c.rows]
    return statistics.fmean(found) if found and None not in found else None


def group(results: dict[str, Any]) -> dict[str, list[ReportRow]]:
    """Rows grouped by base model, then by configuration, in sweep order (baselines first)."""
    models: dict[str, dict[tuple, ReportRow]] = {}
    for row in results["runs"]:
        key = (row["method"], row["rank"], row.get("shots", 0), row.get("prompt_format"))
        cells = models.setdefault(row["model"], {})
        cells.setdefault(key, ReportRow(*key[:2], [], *key[2:])).rows.append(row)
    return {model: list(cells.values()) for model, cells in models.items()}
