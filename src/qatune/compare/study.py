"""The recipe study of a sweep: its grid points (first seed, validation set only) grouped into variants, each a
method with everything its points fix except the learning rate, so that the report can show what each variant
reaches at its best learning rate, how that learning rate compares with full fine-tuning's, and the figures
built on the same grouping (plots.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qatune.compare.rows import params_text
from qatune.compare.sweep import METHOD_LABELS, trains_lora

LR = "train.lr"


@dataclass
class Variant:
    """A method and the grid values it fixes besides the learning rate, with its points in learning-rate order."""

    method: str
    fixed: tuple[tuple[str, Any], ...]
    points: list[dict[str, Any]]  # selection rows of results.json

    @property
    def label(self) -> str:
        name = METHOD_LABELS.get(self.method, self.method)
        parts = [_value_text(key, value) for key, value in self.fixed]
        return f"{name} {' '.join(parts)}".strip()

    def best(self, metric: str) -> dict[str, Any] | None:
        """The point with the best validation `metric` (lowest val_loss, else highest); None if none has one."""
        scored = [p for p in self.points if _finite(p.get(metric))]
        if not scored:
            return None
        return (min if metric == "val_loss" else max)(scored, key=lambda p: p[metric])

    @property
    def rank(self) -> int | None:
        return dict(self.fixed).get("lora.r") if trains_lora(self.method) else None


def variants(results: dict[str, Any], model: str) -> list[Variant]:
    """The model's grid points grouped by (method, every grid value but the learning rate), in sweep order."""
    groups: dict[tuple, Variant] = {}
    for row in (r for r in results.get("selection", []) if r["model"] == model):
        fixed = tuple((k, _hashable(v)) for k, v in row["point"].items() if k != LR)
        if trains_lora(row["method"]) and row.get("rank") is not None:
            fixed = (("lora.r", row["rank"]), *fixed)
        groups.setdefault((row["method"], fixed), Variant(row["method"], fixed, [])).points.append(row)
    for variant in groups.values():
        variant.points.sort(key=lambda p: p["point"].get(LR) or 0.0)
    return list(groups.values())


def lr_ratios(found: list[Variant], metric: str) -> list[tuple[Variant, float, float]]:
    """(LoRA variant, its best learning rate, that over full fine-tuning's best) for every LoRA variant that tried
    two or more learning rates; empty when full fine-tuning tried fewer than two."""
    fulls = [v for v in found if v.method == "full" and len(v.points) > 1 and v.best(metric)]
    if not fulls:
        return []
    full_lr = fulls[0].best(metric)["point"][LR]
    return [(v, v.best(metric)["point"][LR], v.best(metric)["point"][LR] / full_lr) for v in found
            if trains_lora(v.method) and len(v.points) > 1 and v.best(metric)]


def study_lines(results: dict[str, Any], model: str) -> list[str]:
    """The study table (one row per variant, at its best learning rate) and the learning-rate ratio sentence."""
    metric = results["select_metric"]
    found = [v for v in variants(results, model) if v.best(metric)]
    if len(found) < 2 or not any(p["point"] for v in found for p in v.points):  # no grid: nothing was studied
        return []
    lines = ["Every grid point was trained with the first seed and scored on the validation set only. A variant is a "
             "method with everything but the learning rate fixed; each row is its best learning rate.", "",
             f"| variant | trainable params | learning rates tried | best lr | validation {metric} | "
             "validation loss there | lowest validation loss (its lr) |", "|---|---|---|---|---|---|---|"]
    for v in found:
        best, lowest = v.best(metric), v.best("val_loss")
        tried = ", ".join(lr_text(p) for p in v.points)
        there = f"{_short_num(lowest['val_loss'])} ({lr_text(lowest)})" if lowest else "-"
        lines.append(f"| {v.label} | {params_text(best.get('trainable_params'))} | {tried} | "
                     f"{lr_text(best)} | {_short_num(best.get(metric))} | "
                     f"{_short_num(best.get('val_loss'))} | {there} |")
    return lines + _ratio_lines(found, metric)


def _ratio_lines(found: list[Variant], metric: str) -> list[str]:
    """The learning-rate ratios by the selection metric, and by the validation loss (the measure the literature
    reports the ratio on)."""
    lines = []
    for by in dict.fromkeys((metric, "val_loss")):
        ratios = lr_ratios(found, by)
        if ratios:
            full_lr = ratios[0][1] / ratios[0][2]
            lines += ["", f"Best learning rate of each LoRA variant over full fine-tuning's ({full_lr:g}), by "
                      f"validation {by}: " + "; ".join(f"{v.label} {lr:g} ({ratio:.3g}x)" for v, lr, ratio in ratios)
                      + "."]
    if lines:
        lines += ["", "The grids are spaced by about 3x, so each ratio is known to within that factor."]
    return lines


def lr_text(point_row: dict[str, Any]) -> str:
    """A grid point's learning rate as the report writes it; "base" where the grid does not set it."""
    lr = point_row["point"].get(LR)
    return "base" if lr is None else f"{lr:g}"


def rank_family(found: list[Variant]) -> list[Variant]:
    """The LoRA variants that differ only in rank, from the largest such family (the study's rank axis)."""
    families: dict[tuple, list[Variant]] = {}
    for v in (v for v in found if v.method == "lora" and v.rank is not None):
        families.setdefault(tuple(kv for kv in v.fixed if kv[0] != "lora.r"), []).append(v)
    best = max(families.values(), key=len, default=[])
    return sorted(best, key=lambda v: v.rank) if len(best) > 1 else []


def _value_text(key: str, value: Any) -> str:
    leaf = key.rpartition(".")[2]
    if key == "lora.r":
        return f"r={value}"
    if key == "lora.targets":
        return "+".join(value) if isinstance(value, (list, tuple)) else str(value)
    if key == "data.prompt_format":
        return str(value)
    return f"{leaf}={value:g}" if isinstance(value, float) else f"{leaf}={value}"


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _short_num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
