"""report.md, plots and a verdict from a sweep's measurements (`compare.collect_results`).

The verdict is derived from the numbers by fixed rules, so that it says what this sweep measured and not
what LoRA is expected to do. Two results count as different only when they differ by more than two
standard errors of the difference; a configuration's standard error combines the test-set sampling error
(the spread of the per-input scores over the square root of their number) with the spread over seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune.utils.io import atomic_write_text

QA_COLUMNS = [("em", "EM"), ("f1", "F1")]
NLG_COLUMNS = [("bleu", "BLEU"), ("nist", "NIST"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr")]
# Full fine-tuning must beat LoRA by more than noise AND keep LoRA under this share of its quality before the
# verdict calls the gap large; in between, LoRA is "worth it when its savings matter".
CLOSE_ENOUGH = 0.9


def model_label(model: str) -> str:
    """A short, file-name-safe name for a model source: a local directory's name, or the hub id."""
    return Path(model).name if Path(model).exists() else model.replace("/", "_")


@dataclass
class Config:
    """One (model, method, rank) cell: its runs over seeds."""

    method: str
    rank: int | None
    rows: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return f"LoRA r={self.rank}" if self.method == "lora" else self.method

    def values(self, key: str) -> list[float]:
        """A run field (summary) or an evaluation field, over seeds, skipping missing values."""
        found = [row.get(key, row["eval"].get(key)) for row in self.rows]
        return [v for v in found if v is not None]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else None

    def stderr(self, key: str) -> float:
        """Test-sampling error and seed spread of the mean, combined (see the module docstring)."""
        test = statistics.fmean(self.values("quality_stderr") or [0.0])
        seed = (self.std(key) or 0.0) / math.sqrt(len(self.rows))
        return math.hypot(test, seed)


def group(results: dict[str, Any]) -> dict[str, list[Config]]:
    """Runs grouped by base model, then by (method, rank), in sweep order."""
    models: dict[str, dict[tuple[str, int | None], Config]] = {}
    for row in results["runs"]:
        cells = models.setdefault(row["model"], {})
        cells.setdefault((row["method"], row["rank"]), Config(row["method"], row["rank"], [])).rows.append(row)
    return {model: list(cells.values()) for model, cells in models.items()}


def write_report(results: dict[str, Any], out: Path) -> Path:
    """report.md and one set of PNGs per base model in `out`; returns the report's path."""
    columns = QA_COLUMNS if results["task"] == "qa" else NLG_COLUMNS
    lines = _header(results)
    for model, configs in group(results).items():
        plots = _plots(model_label(model), configs, columns[-1 if results["task"] == "qa" else 0], out)
        lines += [f"## {model}", "", *_table(configs, columns), "", *_setup(configs), "",
                  "### Verdict", "", verdict(configs, results["task"]), "",
                  *[f"![{name}]({name})" for name in plots], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------- verdict


def verdict(configs: list[Config], task: str) -> str:
    """A paragraph computed from the measurements: best method, LoRA-vs-full gap, cost ratios, conclusion."""
    key, name = ("f1", "F1") if task == "qa" else ("bleu", "BLEU")
    quality = {c.label: c.mean(key) for c in configs}
    best = max(configs, key=lambda c: quality[c.label])
    says = [f"Best {name}: {best.label} ({quality[best.label]:.1f})."]
    zero = next((c for c in configs if c.method == "zero-shot"), None)
    full = next((c for c in configs if c.method == "full"), None)
    loras = [c for c in configs if c.method == "lora"]
    if zero is not None:
        says.append(f"The base model as shipped scores {quality[zero.label]:.1f}; "
                    f"fine-tuning changes that by {quality[best.label] - quality[zero.label]:+.1f} points.")
    if full is None or not loras:
        return " ".join(says + ["The sweep has no full-vs-LoRA pair to compare."])

    lora = max(loras, key=lambda c: quality[c.label])
    lq, fq = quality[lora.label], quality[full.label]
    gap, noise = lq - fq, 2 * math.hypot(lora.stderr(key), full.stderr(key))
    relative = lq / fq if fq > 0 else math.inf
    if len(loras) > 1:
        spread = max(quality[c.label] for c in loras) - min(quality[c.label] for c in loras)
        says.append(f"Across LoRA ranks {name} spans {spread:.1f} points "
                    f"({'within' if spread <= noise else 'beyond'} the noise of ±{noise:.1f}).")
    says.append(f"Best LoRA ({lora.label}) versus full fine-tuning: {gap:+.1f} points "
                f"({_percent(relative)} of full's {name}), {_costs(lora, full)}.")

    top = lora if lq >= fq else full
    learned = zero is None or quality[top.label] - quality[zero.label] > 2 * math.hypot(zero.stderr(key),
                                                                                        top.stderr(key))
    if not learned:
        says.append("Conclusion: neither method beats the untrained model by more than the noise, so this "
                    "sweep cannot tell whether LoRA is worth it; train longer or on more data.")
    elif gap > noise or (gap >= -noise and relative >= CLOSE_ENOUGH):
        lead = f"ahead of full fine-tuning by {gap:.1f} points" if gap > noise else \
            "within the noise of full fine-tuning"
        says.append(f"Conclusion: {lora.label} is {lead} "
                    f"({_percent(relative)} of its {name}) with {_percent(_ratio(lora, full, 'trainable_params'))} "
                    f"of the trainable parameters and {_fraction(_ratio(lora, full, 'result_bytes'))} of the disk; "
                    f"on this data LoRA is worth it.")
    elif gap >= -noise:
        says.append(f"Conclusion: full fine-tuning leads by {-gap:.1f} points (LoRA reaches {_percent(relative)}), "
                    f"but that is inside the noise of ±{noise:.1f}, so this sweep cannot separate the two; at "
                    f"{_fraction(_ratio(lora, full, 'result_bytes'))} of the disk and "
                    f"{_times(_ratio(lora, full, 'peak_memory_bytes'))} the memory LoRA is the better buy unless more "
                    f"test data or seeds confirm the gap.")
    elif relative >= CLOSE_ENOUGH:
        says.append(f"Conclusion: full fine-tuning wins by {-gap:.1f} points, but LoRA keeps {_percent(relative)} "
                    f"of its {name}: LoRA is worth it when its savings ({_fraction(_ratio(lora, full, 'result_bytes'))}"
                    f" of the disk per task, {_times(_ratio(lora, full, 'peak_memory_bytes'))} the peak memory) "
                    f"matter more than {-gap:.1f} points of {name}.")
    else:
        says.append(f"Conclusion: full fine-tuning wins by {-gap:.1f} points (LoRA reaches only "
                    f"{_percent(relative)}); LoRA is worth it only where full fine-tuning does not fit in memory or "
                    f"many task variants must be stored; otherwise fine-tune fully.")
    return " ".join(says)


def _ratio(a: Config, b: Config, key: str) -> float | None:
    x, y = a.mean(key), b.mean(key)
    return x / y if x is not None and y else None


def _costs(lora: Config, full: Config) -> str:
    return (f"{_percent(_ratio(lora, full, 'trainable_params'))} of the trainable parameters, "
            f"{_fraction(_ratio(lora, full, 'result_bytes'))} of the saved size, "
            f"{_times(_ratio(lora, full, 'peak_memory_bytes'))} the peak memory and "
            f"{_times(_ratio(lora, full, 'wall_time_s'))} the training time")


def _percent(x: float | None) -> str:
    if x is None or math.isinf(x):
        return "n/a"
    return f"{100 * x:.2g}%" if x < 0.01 else f"{100 * x:.0f}%"


def _fraction(x: float | None) -> str:
    return "n/a" if not x else f"1/{1 / x:.0f}" if x < 0.5 else f"{x:.2f}x"


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


# ------------------------------------------------------------------------------------------------- text


def _header(results: dict[str, Any]) -> list[str]:
    env, ev, data = results["environment"], results["eval"], results["base"].get("data", {})
    versions = env["versions"]
    hardware = (f"{env['cpu']} ({env['cpu_count']} cores, torch using {env['torch_threads']} thread(s))"
                + (f", GPU {env['gpu']['name']}" if env["gpu"] else ", no GPU"))
    slices = "; ".join(f"`{name}` = lines {s.get('start', 0)}-{s.get('stop', 'end')} of `{s['source']}`"
                       for name, s in results["slices"].items())
    validation = data.get("val") or \
        f"{data.get('val_fraction', 0.1):.0%} of train, split by question with the run's seed"
    gen = ev.get("generation", {})
    lines = [f"# Is LoRA worth it? `{results['sweep']}`", ""]
    if results["description"]:
        lines += [results["description"].strip(), ""]
    lines += [
        f"- Generated by `qatune compare {results['sweep_file']}` on {env['date'][:10]}; total wall time "
        f"{results['wall_time_s'] / 60:.1f} min ({results['invocations']} invocation(s), training and evaluation).",
        f"- Hardware: {hardware}. Software: qatune {versions['qatune']}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}, Python {versions['python']}.",
        f"- Training data: `{_short(data.get('train'))}`; validation: {_short(validation)}."
        + (f" Slices: {slices}." if slices else ""),
        f"- Test data: `{_short(ev['data'])}`" + (f", first {ev['max_examples']} "
                                                  f"{'inputs' if results['task'] == 'nlg' else 'examples'}"
                                                  if ev.get("max_examples") else "") + f" ({results['task']} task).",
        f"- Decoding: {', '.join(f'{k}={v}' for k, v in gen.items()) or 'greedy'}. Seeds: "
        f"{', '.join(map(str, results['seeds']))}; tables give mean ± std over seeds.",
        "- Peak memory is the training process's peak resident set on CPU, peak allocated memory on CUDA. "
        "Result size: the saved weights and their config (adapter for LoRA, whole model for full), without "
        "tokenizer files. Test loss: teacher-forced, answer tokens only.",
        "- The verdict calls a difference noise when it is under two standard errors (test-set sampling error "
        "from the per-input scores, plus the spread over seeds when there are several).",
        "",
    ]
    return lines


def _short(path: Any) -> str:
    """Slice files live in the sweep's output directory: show them relative to it."""
    text = str(path)
    return text.split("/data/", 1)[-1] if "/data/" in text and "shared" not in text else text


def _table(configs: list[Config], columns: list[tuple[str, str]]) -> list[str]:
    head = ["method", "trainable params", "%", "result size", "peak memory", "train time", "tokens/s",
            "best val loss", "test loss", *(title for _, title in columns), "empty answers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        trained = c.method != "zero-shot"
        cells = [c.label,
                 _num(c, "trainable_params", _params) if trained else "0",
                 _num(c, "trainable_percent", lambda v: f"{v:.3g}") if trained else "0",
                 _num(c, "result_bytes", _bytes) if trained else "-",
                 _num(c, "peak_memory_bytes", _bytes) if trained else "-",
                 _num(c, "wall_time_s", lambda v: f"{v / 60:.1f} min") if trained else "-",
                 _num(c, "tokens_per_s", lambda v: f"{v:,.0f}") if trained else "-",
                 _num(c, "best_val_loss", lambda v: f"{v:.3f}") if trained else "-",
                 _num(c, "loss", lambda v: f"{v:.3f}"),
                 *(_num(c, key, lambda v, k=key: f"{v:.2f}" if k in ("nist", "cider") else f"{v:.1f}")
                   for key, _ in columns),
                 _num(c, "empty_predictions", lambda v, n=c.rows[0]["eval"]["inputs"]: f"{v:.0f} / {n}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _setup(configs: list[Config]) -> list[str]:
    """The resolved training recipe of each method (what the numbers above were measured with)."""
    lines = ["| method | epochs | max steps | steps run | batch | lr | schedule | warm-up | max length | LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        if c.method == "zero-shot":
            continue
        row, cfg = c.rows[0], c.rows[0]["config"]
        t, lora = cfg["train"], cfg["lora"]
        lora_text = "-" if not lora else \
            f"alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, targets {lora['targets'] or 'default'}"
        lines.append(f"| {c.label} | {t['epochs']} | {t['max_steps'] or '-'} | {row['steps']} | {t['batch_size']} "
                     f"| {t['lr']:g} | {t['schedule']} | {t['warmup_steps']} | {cfg['data']['max_length']} "
                     f"| {lora_text} |")
    return lines


def _num(c: Config, key: str, fmt) -> str:
    mean, std = c.mean(key), c.std(key)
    if mean is None:
        return "-"
    return fmt(mean) + (f" ± {fmt(std)}" if std is not None else "")


def _params(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ plots


def _plots(slug: str, configs: list[Config], metric: tuple[str, str], out: Path) -> list[str]:
    """Validation-loss curves, quality vs trainable parameters, and cost bars; returns the file names."""
    import matplotlib  # heavy: imported only when plots are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [c for c in configs if c.method != "zero-shot"]
    names = [f"{slug}-val-loss.png", f"{slug}-quality-vs-params.png", f"{slug}-cost.png"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in trained:
        for i, row in enumerate(c.rows):
            if row.get("val_curve"):
                # x in training examples, not steps: the methods' recipes use different batch sizes
                per_step = row["config"]["train"]["batch_size"] * row["config"]["train"]["grad_accum"]
                steps, losses = zip(*row["val_curve"])
                ax.plot([s * per_step for s in steps], losses, marker="o", markersize=3,
                        label=c.label if i == 0 else None, color=f"C{trained.index(c)}")
    ax.set(xlabel="training examples seen", ylabel="validation loss", title="Validation loss (answer tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / names[0], dpi=120)

    key, title = metric
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, c in enumerate(trained):
        ax.errorbar(c.mean("trainable_params"), c.mean(key), yerr=2 * c.stderr(key), fmt="o", capsize=3,
                    color=f"C{i}", label=c.label)
    zero = next((c for c in configs if c.method == "zero-shot"), None)
    if zero is not None:
        ax.axhline(zero.mean(key), linestyle="--", color="gray", label="zero-shot")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log)", ylabel=f"test {title}",
           title=f"{title} vs trainable parameters (error bars: 2 s.e.)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / names[1], dpi=120)

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
    fig.tight_layout()
    fig.savefig(out / names[2], dpi=120)
    plt.close("all")
    return names
