"""The report's plots: validation-loss curves, test quality with intervals against trainable parameters, the
paired changes against the base model on every set, and the costs; and the recipe study's three (validation
set, first seed): the validation metric against the learning rate of each variant, the validation loss against
the step for each LoRA rank beside full fine-tuning, and the validation metric against trainable parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatune.compare.rows import MAIN_SCORE as _MAIN
from qatune.compare.rows import ReportRow, base_row
from qatune.compare.stats import mean_interval, paired_difference
from qatune.compare.study import Variant, lr_text, rank_family, variants


def _pyplot():
    import matplotlib  # heavy: imported only when plots are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_plots(slug: str, configs: list[ReportRow], results: dict[str, Any], out: Path) -> list[str]:
    """Writes the PNGs into `out`; returns their file names."""
    plt = _pyplot()
    names = [f"{slug}-val-loss.png", f"{slug}-quality-vs-params.png", f"{slug}-changes.png", f"{slug}-cost.png"]
    for name, draw in zip(names, (_val_loss, _quality, _changes, _cost)):
        fig = draw(plt, configs, results)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
    plt.close("all")
    return names


def draw_study_plots(slug: str, results: dict[str, Any], model: str, out: Path) -> list[str]:
    """The recipe study's figures for one base model, into `out`; returns their file names."""
    plt, metric = _pyplot(), results["select_metric"]
    found = [v for v in variants(results, model) if v.best(metric)]
    names = [f"{slug}-study-lr.png", f"{slug}-study-ranks.png", f"{slug}-study-params.png"]
    for name, draw in zip(names, (_metric_vs_lr, _loss_by_rank, _metric_vs_params)):
        fig = draw(plt, found, metric)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
    plt.close("all")
    return names


def _metric_vs_lr(plt, found: list[Variant], metric: str):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, v in enumerate(v for v in found if len(v.points) > 1):
        points = [p for p in v.points if p.get(metric) is not None]
        ax.plot([p["point"]["train.lr"] for p in points], [p[metric] for p in points], marker="o",
                color=f"C{i}", linestyle="--" if v.method == "full" else "-", label=v.label)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log)", ylabel=f"best validation {metric}",
           title=f"Validation {metric} against learning rate")
    ax.legend(fontsize=7)
    return fig


def _loss_by_rank(plt, found: list[Variant], metric: str):
    """Each rank's run at its best learning rate, beside full fine-tuning's: loss after the same steps."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    shown = rank_family(found) + [v for v in found if v.method == "full"][:1]
    for i, v in enumerate(shown):
        curve = [(e["step"], e["val_loss"]) for e in v.best(metric).get("curve", []) if e.get("val_loss") is not None]
        if curve:
            ax.plot(*zip(*curve), marker="o", markersize=3, color=f"C{i}",
                    linestyle="--" if v.method == "full" else "-", label=f"{v.label} (lr {lr_text(v.best(metric))})")
    ax.set(xlabel="optimizer step (same examples per step for every run)", ylabel="validation loss",
           title="Validation loss by LoRA rank and full fine-tuning")
    ax.legend(fontsize=7)
    return fig


def _metric_vs_params(plt, found: list[Variant], metric: str):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, v in enumerate(found):
        best = v.best(metric)
        if best.get("trainable_params"):
            ax.scatter(best["trainable_params"], best[metric], color=f"C{i % 10}",
                       marker="s" if v.method == "full" else "o", label=v.label)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log)", ylabel=f"best validation {metric}",
           title=f"Validation {metric} against trainable parameters (each at its best lr)")
    ax.legend(fontsize=7)
    return fig


def _val_loss(plt, configs: list[ReportRow], results: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(6, 4))
    trained = [c for c in configs if c.trained]
    for i, c in enumerate(trained):
        for j, row in enumerate(c.rows):
            if row.get("val_curve"):
                # x in training examples, not steps: the methods' recipes use different batch sizes
                per_step = row["config"]["train"]["batch_size"] * row["config"]["train"]["grad_accum"]
                steps, losses = zip(*row["val_curve"])
                ax.plot([s * per_step for s in steps], losses, marker="o", markersize=3,
                        label=c.label if j == 0 else None, color=f"C{i}")
    ax.set(xlabel="training examples seen", ylabel="validation loss", title="Validation loss (answer tokens)")
    ax.legend()
    return fig


def _quality(plt, configs: list[ReportRow], results: dict[str, Any]):
    key, name = _MAIN[results["task"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, c in enumerate(configs):
        interval = mean_interval(c.matrix("test", key))
        if c.trained:
            yerr = [[interval.estimate - interval.low], [interval.high - interval.estimate]]
            ax.errorbar(c.mean("trainable_params"), interval.estimate, yerr=yerr, fmt="o", capsize=3,
                        color=f"C{i}", label=c.label)
        else:
            ax.axhline(interval.estimate, linestyle="--", color=f"C{i}", label=f"{c.label} (untrained)")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log)", ylabel=f"test {name}",
           title=f"Test {name} vs trainable parameters (95% intervals)")
    ax.legend(fontsize=8)
    return fig


def _changes(plt, configs: list[ReportRow], results: dict[str, Any]):
    """Each trained configuration minus the base model, per set and score, with paired intervals."""
    base = base_row(configs, results["task"])
    sets = _change_scores(base, [("test", results["task"])] + [(s["name"], s["task"])
                                                               for s in results.get("extra_eval", [])])
    trained = [c for c in configs if c.trained]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets)), 4))
    width = 0.8 / max(len(trained), 1)
    for i, c in enumerate(trained):
        for j, (dataset, key, _) in enumerate(sets):
            if base is None or c.matrix(dataset, key) is None or base.matrix(dataset, key) is None:
                continue
            d = paired_difference(c.matrix(dataset, key), base.matrix(dataset, key))
            ax.errorbar(j + (i - (len(trained) - 1) / 2) * width, d.estimate,
                        yerr=[[d.estimate - d.low], [d.high - d.estimate]], fmt="o", capsize=3, color=f"C{i}",
                        label=c.label if j == 0 else None)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(sets)), [f"{d}\n({name})" for d, _, name in sets])
    ax.set(ylabel="change vs base model (points)", title="Learning, generalisation, forgetting (95% paired intervals)")
    ax.legend(fontsize=8)
    return fig


def _change_scores(base: ReportRow | None, sets: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(set, per-item score, label): each set's main score, and on QA sets `contains` beside it where measured."""
    scores = []
    for dataset, task in sets:
        scores.append((dataset, *_MAIN[task]))
        if task == "qa" and base is not None and base.matrix(dataset, "contains") is not None:
            scores.append((dataset, "contains", "contains"))
    return scores


def _cost(plt, configs: list[ReportRow], results: dict[str, Any]):
    trained = [c for c in configs if c.trained]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    labels = [c.label for c in trained]
    for ax, (field, scale, ylabel) in zip(axes, [("peak_memory_bytes", 2**30, "peak memory (GiB)"),
                                                 ("wall_time_s", 60, "training time (min)"),
                                                 ("result_bytes", 2**20, "saved result (MiB, log)")]):
        ax.bar(labels, [(c.mean(field) or 0) / scale for c in trained], color=[f"C{i}" for i in range(len(trained))])
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=30)
        if field == "result_bytes":
            ax.set_yscale("log")
    return fig
