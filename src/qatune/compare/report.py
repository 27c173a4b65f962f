"""report.md from a sweep's results.json: tables with intervals, what the selection tried, and a verdict.

Every comparison is paired (`stats.py`): two methods answered the same test items, so each difference is
measured item by item, with a seeded bootstrap interval over items and seeds. The verdict is computed from those
intervals, one sentence per axis (learns, generalises, forgets, costs) and a conclusion, so that it says what
this sweep measured and not what LoRA is expected to do.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from qatune.compare.plots import draw_plots, draw_study_plots
from qatune.compare.rows import (
    MAIN_SCORE,
    SECOND_SCORE,
    ReportRow,
    bar_row,
    base_row,
    group,
    params_text,
    validation_score,
)
from qatune.compare.stats import Interval, mean_interval, paired_difference
from qatune.compare.study import study_lines
from qatune.compare.sweep import model_label, trains_lora
from qatune.utils.io import atomic_write_text

# QA's per-item "the gold answer appears in the output" (evaluation.metrics.contains_answer), shown beside F1/EM:
# it credits sentences that EM calls wrong (and hedges), so it bounds what a model knows from above.
_CONTAINS = "contains"


def write_report(results: dict[str, Any], out: Path) -> Path:
    """report.md and one set of PNGs per base model in `out`; returns the report's path."""
    lines = _header(results)
    task = results["task"]
    for model, configs in group(results).items():
        plots = draw_plots(model_label(model), configs, results, out)
        lines += [f"## {model}", "", "### Learning: the test set", "", *_bar_lines(configs, task),
                  *_test_table(configs, task), ""]
        for spec in results.get("extra_eval", []):
            lines += [f"### {_axis(spec)}: {spec['name']}", "", *_extra_table(configs, spec, task), ""]
        lines += ["### Cost", "", *_cost_table(configs), "", "### Training setup and selection", "",
                  *_setup_table(configs), "", *_selection_lines(results, model), ""]
        study = study_lines(results, model)
        if study:
            figures = draw_study_plots(model_label(model), results, model, out)
            lines += ["### Recipe study (validation set)", "", *study, "", *[f"![{p}]({p})" for p in figures], ""]
        lines += ["### Verdict", "", *verdict(configs, results), "", *[f"![{p}]({p})" for p in plots], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _axis(spec: dict[str, Any]) -> str:
    return "Forgetting" if spec["task"] == "mc" else "Generalisation"


# --------------------------------------------------------------------------------------------- tables


def _full(configs: list[ReportRow]) -> ReportRow | None:
    return next((c for c in configs if c.method == "full"), None)


def _lora(configs: list[ReportRow]) -> ReportRow | None:
    """The LoRA configuration the verdict speaks for: the one with the most seeds (the main rank), then the
    best validation loss; never chosen by a test score."""
    loras = [c for c in configs if c.method == "lora"]
    return min(loras, key=lambda c: (-len(c.rows), c.mean("best_val_loss") or 0.0), default=None)


def _diff(a: ReportRow | None, b: ReportRow | None, dataset: str, key: str) -> Interval | None:
    if a is None or b is None or a.matrix(dataset, key) is None or b.matrix(dataset, key) is None:
        return None
    return paired_difference(a.matrix(dataset, key), b.matrix(dataset, key))


def _mean(c: ReportRow, dataset: str, key: str) -> Interval | None:
    m = c.matrix(dataset, key)
    return mean_interval(m) if m is not None else None


def _cell(interval: Interval | None, signed: bool = False) -> str:
    return interval.format(signed=signed) if interval is not None else "-"


def _bar_lines(configs: list[ReportRow], task: str) -> list[str]:
    bar, (key, name) = bar_row(configs, task), MAIN_SCORE[task]
    if bar is None or validation_score(bar, key) is None:
        return []
    return [f"The bar is **{bar.label}**, the baseline with the best validation {name} "
            f"({validation_score(bar, key):.1f}); every baseline was asked the validation questions in each "
            "prompt format, and the test set scored them all.", ""]


def _test_table(configs: list[ReportRow], task: str) -> list[str]:
    (key, name), (key2, name2) = MAIN_SCORE[task], SECOND_SCORE[task]
    bar, full = bar_row(configs, task), _full(configs)
    knows_head, knows_rule = _knows_columns(task)
    lines = [f"| method | seeds | validation {name} | {name} [95% CI] | {name2} [95% CI] | {knows_head}"
             f"Δ{name} vs the bar | Δ{name} vs full | test loss | empty answers |",
             f"|---|---|---|---|---|{knows_rule}---|---|---|---|"]
    for c in configs:
        empty = statistics.fmean(r["empty_predictions"] for r in c.rows)
        label = f"{c.label} (the bar)" if c is bar else c.label
        lines.append(f"| {label} | {len(c.rows)} | {_num(validation_score(c, key), '.1f')} | "
                     f"{_cell(_mean(c, 'test', key))} | {_cell(_mean(c, 'test', key2))} | "
                     f"{_knows_cells(c, 'test', task)}"
                     f"{_cell(_diff(c, bar, 'test', key), True) if c is not bar else '-'} | "
                     f"{_cell(_diff(c, full, 'test', key), True) if trains_lora(c.method) else '-'} | "
                     f"{_loss(c)} | {empty:.0f} / {c.rows[0]['eval']['inputs']} |")
    return lines


def _knows_columns(task: str) -> tuple[str, str]:
    """QA tables show `contains` and the answer length beside F1 and EM: header cells and their rule."""
    return ("contains [95% CI] | words per answer | ", "---|---|") if task == "qa" else ("", "")


def _knows_cells(c: ReportRow, dataset: str, task: str) -> str:
    return f"{_cell(_mean(c, dataset, _CONTAINS))} | {_num(_words(c, dataset), '.1f')} | " if task == "qa" else ""


def _words(c: ReportRow, dataset: str) -> float | None:
    """Mean answer length in words over the seeds, from metrics.json; None where it was not measured."""
    found = [(r["eval"] if dataset == "test" else r.get("extra", {}).get(dataset, {})).get("answer_length")
             for r in c.rows]
    return statistics.fmean(found) if found and None not in found else None


def _loss(c: ReportRow) -> str:
    losses = [r["eval"].get("loss") for r in c.rows if r["eval"].get("loss") is not None]
    return f"{statistics.fmean(losses):.3f}" if losses else "-"


def _extra_table(configs: list[ReportRow], spec: dict[str, Any], task: str) -> list[str]:
    (key, name), (key2, name2) = MAIN_SCORE[spec["task"]], SECOND_SCORE[spec["task"]]
    dataset, base, full = spec["name"], base_row(configs, task), _full(configs)
    knows_head, knows_rule = _knows_columns(spec["task"])
    lines = [f"| method | {name} [95% CI] | {name2} [95% CI] | {knows_head}Δ{name} vs base model | Δ{name} vs full |",
             f"|---|---|---|{knows_rule}---|---|"]
    for c in (c for c in configs if c.matrix(dataset, key) is not None):
        lines.append(f"| {c.label} | {_cell(_mean(c, dataset, key))} | {_cell(_mean(c, dataset, key2))} | "
                     f"{_knows_cells(c, dataset, spec['task'])}"
                     f"{_cell(_diff(c, base, dataset, key), True) if c is not base else '-'} | "
                     f"{_cell(_diff(c, full, dataset, key), True) if trains_lora(c.method) else '-'} |")
    return lines


def _cost_table(configs: list[ReportRow]) -> list[str]:
    lines = ["| method | trainable params | % | result size | peak memory | train time | time per step | tokens/s | "
             "best val loss |", "|---|---|---|---|---|---|---|---|---|"]
    for c in (c for c in configs if c.trained):
        lines.append(f"| {c.label} | {params_text(c.mean('trainable_params'))} | {c.mean('trainable_percent'):.3g} | "
                     f"{_bytes(c.mean('result_bytes'))} | {_bytes(c.mean('peak_memory_bytes'))} | "
                     f"{c.mean('wall_time_s') / 60:.1f} min | {_num(_step_time(c), '.2f')} s | "
                     f"{c.mean('tokens_per_s'):,.0f} | {_num(c.mean('best_val_loss'), '.3f')} |")
    return lines + ["", "Time per step: the training's wall time (its evaluations included) over its optimizer steps."]


def _step_time(c: ReportRow) -> float | None:
    times = [row["wall_time_s"] / row["steps"] for row in c.rows if row.get("wall_time_s") and row.get("steps")]
    return statistics.fmean(times) if times else None


def _setup_table(configs: list[ReportRow]) -> list[str]:
    """The resolved recipe of each trained configuration (its picked grid point included)."""
    lines = ["| method | picked | epochs | steps run | batch | lr | schedule | warm-up | max length | LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in (c for c in configs if c.trained):
        row, cfg = c.rows[0], c.rows[0]["config"]
        t, lora = cfg["train"], cfg["lora"]
        lora_text = "-" if not lora else \
            f"alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, targets {lora['targets'] or 'default'}"
        picked = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["point"].items())
        lines.append(f"| {c.label} | {picked or '-'} | {t['epochs']} | {row['steps']} | {t['batch_size']} | "
                     f"{t['lr']:g} | {t['schedule']} | {t['warmup_steps']} | {cfg['data']['max_length']} | "
                     f"{lora_text} |")
    return lines


def _selection_lines(results: dict[str, Any], model: str) -> list[str]:
    tried = [r for r in results.get("selection", []) if r["model"] == model and r["point"]]
    if not tried:
        return ["No hyper-parameter grid: each method ran at the configuration above."]
    metric = results["select_metric"]
    shown = list(dict.fromkeys(("val_loss", metric)))
    head = " | ".join(f"validation {m}" for m in shown)
    lines = [f"Hyper-parameters were picked on the validation set only (best {metric}, first seed); the test set "
             "scored the picks alone.", "", f"| run | point | {head} | picked |",
             "|---|---|" + "---|" * len(shown) + "---|"]
    for r in tried:
        point = ", ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in r["point"].items())
        values = " | ".join(_num(r.get(m), ".4f") for m in shown)
        lines.append(f"| {r['name']} | {point} | {values} | {'yes' if r['picked'] else ''} |")
    return lines + _disagreement(tried, metric)


def _disagreement(tried: list[dict[str, Any]], metric: str) -> list[str]:
    """Where the validation loss would have picked another point of a configuration than `metric` did."""
    if metric == "val_loss":
        return []
    lines = []
    for method in dict.fromkeys(r["method"] for r in tried):
        rows = [r for r in tried if r["method"] == method and r.get("val_loss") is not None]
        picked = next((r for r in rows if r["picked"]), None)
        by_loss = min(rows, key=lambda r: r["val_loss"], default=None)
        if picked is not None and by_loss is not None and by_loss is not picked:
            lines.append(f"- {method}: the lowest validation loss ({by_loss['val_loss']:.4f}) is `{by_loss['name']}`, "
                         f"whose validation {metric} is {_num(by_loss.get(metric), '.2f')}; the pick has "
                         f"{_num(picked.get(metric), '.2f')}.")
    return ["", "Where the validation loss and the answers disagree:", "", *lines] if lines else []


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _bytes(n: float | None) -> str:
    return "-" if n is None else (f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB")


# --------------------------------------------------------------------------------------------- header


def _header(results: dict[str, Any]) -> list[str]:
    env, ev, data = results["environment"], results["eval"], results["base"].get("data", {})
    versions = env["versions"]
    hardware = (f"{env['cpu']} ({env['cpu_count']} cores, torch using {env['torch_threads']} thread(s))"
                + (f", GPU {env['gpu']['name']}" if env["gpu"] else ", no GPU"))
    validation = data.get("val") or f"{data.get('val_fraction', 0.1):.0%} of train, split by question with the seed"
    gen = ev.get("generation", {})
    extras = "; ".join(f"`{s['name']}` ({s['task']}, {_short(s['data'])}"
                       + (f", first {s['max_examples']}" if s.get("max_examples") else "") + ")"
                       for s in results.get("extra_eval", []))
    lines = [f"# Is LoRA worth it? `{results['sweep']}`", ""]
    if results["description"]:
        lines += [results["description"].strip(), ""]
    lines += [
        f"- Generated by `qatune compare {results['sweep_file']}` on {env['date'][:10]}; total wall time "
        f"{results['wall_time_s'] / 60:.1f} min ({results['invocations']} invocation(s), training and evaluation).",
        *_budget_line(results),
        f"- Hardware: {hardware}. Software: qatune {versions['qatune']}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}, Python {versions['python']}.",
        f"- Training data: `{_short(data.get('train'))}`; validation: {_short(validation)}. Prompt format: "
        f"{data.get('prompt_format', 'auto')} (where the grid does not set it); each baseline is asked in "
        "every format the model has, and the one with the best validation score is the bar.",
        f"- Test data: `{_short(ev['data'])}`" + (f", first {ev['max_examples']}" if ev.get("max_examples") else "")
        + f" ({results['task']}). Further sets: {extras or 'none'}.",
        f"- Decoding: {', '.join(f'{k}={v}' for k, v in gen.items()) or 'greedy'}. Seeds: "
        f"{', '.join(map(str, results['seeds']))}."
        + (f" Few-shot baseline: {results['few_shot']} training examples drawn with seed {results['seeds'][0]}."
           if results.get("few_shot") else ""),
        "- Intervals are 95% paired bootstrap intervals (2,000 resamples of the test items and of the seeds): a "
        "difference between two rows is computed item by item on the items both answered.",
        "- Peak memory: the training process's peak resident set on CPU, peak allocated memory on CUDA. Result size: "
        "the saved weights and their config (adapter for LoRA, whole model for full), without tokenizer files.",
        "",
    ]
    return lines


def _budget_line(results: dict[str, Any]) -> list[str]:
    budget, first = results.get("training"), len(results.get("selection", []))
    if not budget:
        return []
    answering = (f", of which {budget['generate_s'] / 60:.1f} min answering the validation questions that "
                 f"selection reads" if budget.get("generate_s") else "")
    return [f"- Budget: {budget['runs']} training run(s) ({first} with the first seed: every configuration and grid "
            f"point; {budget['runs'] - first} with the other seeds of the picked configurations), "
            f"{budget['wall_time_s'] / 60:.1f} min of training in all{answering}; the rest of the wall time is "
            "evaluation."]


def _short(path: Any) -> str:
    """Slice files live in the sweep's output directory: show them relative to it."""
    text = str(path)
    return text.split("/data/", 1)[-1] if "/data/" in text and "shared" not in text else text


# --------------------------------------------------------------------------------------------- verdict


def verdict(configs: list[ReportRow], results: dict[str, Any]) -> list[str]:
    """One sentence per axis, then the conclusion, each computed from the paired intervals."""
    full, lora = _full(configs), _lora(configs)
    bar, base = bar_row(configs, results["task"]), base_row(configs, results["task"])
    key, name = MAIN_SCORE[results["task"]]
    learns = _learns_sentence(full, lora, bar, key, name)
    lines = [f"- **Learns.** {learns}"]
    knows = _knows_sentence(configs, full, lora) if results["task"] == "qa" else None
    if knows is not None:
        lines.append(f"- **Knows.** {knows}")
    for spec in results.get("extra_eval", []):
        lines.append(f"- **{'Forgets' if spec['task'] == 'mc' else 'Generalises'} ({spec['name']}).** "
                     + _versus_base_sentence(full, lora, base, spec))
    family = _variants_sentence(configs, full, lora, results)
    if family is not None:
        lines.append(f"- **Variants.** {family}")
    if full is not None and lora is not None:
        lines.append(f"- **Costs.** {_costs(lora, full)}{_variant_costs(configs, lora)}")
    lines.append(f"\n**Conclusion:** {_conclusion(full, lora, bar, key, name)}")
    return lines


def _compare_words(interval: Interval, name: str, a: str, b: str) -> str:
    if not interval.excludes_zero:
        return (f"{a} and {b} are indistinguishable ({a} minus {b}: {interval.format(signed=True)} {name}, "
                "an interval that includes zero)")
    lead = interval.estimate > 0
    low, high = (interval.low, interval.high) if lead else (-interval.high, -interval.low)
    return f"{a} {'leads' if lead else 'trails'} {b} by {abs(interval.estimate):.1f} {name} [{low:.1f}, {high:.1f}]"


def _learns_sentence(full, lora, bar, key, name) -> str:
    parts = []
    for c in (x for x in (full, lora) if x is not None):
        gain = _diff(c, bar, "test", key)
        parts.append(f"{c.label} scores {_cell(mean_interval(c.matrix('test', key)))} {name}"
                     + (f" ({gain.format(signed=True)} over the bar)" if gain else ""))
    text = "; ".join(parts) + "."
    if full is not None and lora is not None:
        text += " " + _compare_words(_diff(lora, full, "test", key), name, lora.label, "full fine-tuning") + "."
    if bar is not None:
        tuned = [c for c in (full, lora) if c is not None]
        beaten = [c.label for c in tuned if _diff(c, bar, "test", key).low > 0]
        which = "Neither fine-tuned model beats" if len(tuned) > 1 else "The fine-tuned model does not beat"
        text += (f" {' and '.join(beaten)} beat{'s' if len(beaten) == 1 else ''} the bar, {bar.label} "
                 f"({bar.matrix('test', key).mean():.1f} {name})." if beaten else
                 f" {which} the bar, {bar.label} ({bar.matrix('test', key).mean():.1f} {name}), beyond the noise.")
    return text


def _knows_sentence(configs: list[ReportRow], full: ReportRow | None, lora: ReportRow | None) -> str | None:
    """How often the answer appears in the output, fine-tuned against the baseline that says it most often (the
    harder comparison): EM rewards answering in the training data's short form, `contains` asks whether the model
    said the answer at all, which is what a gain in knowledge has to show."""
    baselines = [c for c in configs if not c.trained and c.matrix("test", _CONTAINS) is not None]
    tuned = [c for c in (full, lora) if c is not None and c.matrix("test", _CONTAINS) is not None]
    if not baselines or not tuned:
        return None  # an evaluation from before `contains` existed
    best = max(baselines, key=lambda c: c.matrix("test", _CONTAINS).mean())
    parts = []
    for c in tuned:
        change = _diff(c, best, "test", _CONTAINS)
        parts.append(f"{c.label} changes it by {change.format(signed=True)} points"
                     + ("" if change.excludes_zero else " (an interval that includes zero)"))
    words = ", ".join(f"{c.label} {w:.1f}" for c in (*baselines, *tuned) if (w := _words(c, "test")) is not None)
    return (f"The answer appears in the output (`contains`) in {best.matrix('test', _CONTAINS).mean():.1f}% of the "
            f"answers of {best.label}, the baseline that says it most often; against it, " + "; ".join(parts)
            + ". `contains` also credits a hedge that lists several guesses, so it bounds knowledge from above"
            + (f" (words per answer: {words})." if words else "."))


def _versus_base_sentence(full, lora, base, spec) -> str:
    key, name = MAIN_SCORE[spec["task"]]
    parts = []
    for c in (x for x in (full, lora) if x is not None):
        change = _diff(c, base, spec["name"], key)
        if change is not None:
            parts.append(f"{c.label} changes {name} by {change.format(signed=True)} against the base model")
    text = "; ".join(parts) + "." if parts else "not measured."
    versus = _diff(lora, full, spec["name"], key)
    if versus is not None:
        text += " " + _compare_words(versus, name, lora.label, "full fine-tuning") + "."
    return text


def _costs(lora: ReportRow, full: ReportRow) -> str:
    def ratio(field_name: str) -> float:
        return (lora.mean(field_name) or 0) / max(full.mean(field_name) or 1, 1e-9)

    return (f"{lora.label} trains {lora.mean('trainable_percent'):.2g}% of the parameters; its result takes "
            f"1/{1 / max(ratio('result_bytes'), 1e-12):.0f} of the disk, {ratio('peak_memory_bytes'):.2f}x the peak "
            f"memory and {ratio('wall_time_s'):.2f}x the training time of full fine-tuning.")


def _variants_sentence(configs: list[ReportRow], full: ReportRow | None, lora: ReportRow | None,
                       results: dict[str, Any]) -> str | None:
    """LoRA and its variants against full fine-tuning on the test set, and the one the validation set prefers
    (named on validation alone, then measured on test)."""
    family = [c for c in configs if trains_lora(c.method)]
    if full is None or all(c.method == "lora" for c in family):
        return None
    key, name = MAIN_SCORE[results["task"]]
    metric = results["select_metric"]
    parts = [f"{c.label} {_diff(c, full, 'test', key).format(signed=True)}" for c in family]
    scored = [c for c in family if validation_score(c, metric) is not None]
    text = f"Against full fine-tuning (test {name}, paired): " + "; ".join(parts) + "."
    if scored:
        pick = (min if metric == "val_loss" else max)(scored, key=lambda c: validation_score(c, metric))
        text += (f" The validation set prefers {pick.label} (validation {metric} "
                 f"{validation_score(pick, metric):.4g}); "
                 + _compare_words(_diff(pick, full, "test", key), name, pick.label, "full fine-tuning") + ".")
        if lora is not None and pick is not lora:
            text += " " + _compare_words(_diff(pick, lora, "test", key), name, pick.label, lora.label) + "."
    return text


def _variant_costs(configs: list[ReportRow], lora: ReportRow) -> str:
    """Each LoRA variant's time per step and peak memory against plain LoRA's."""
    parts = []
    for c in (c for c in configs if trains_lora(c.method) and c.method != "lora"):
        time, base = _step_time(c), _step_time(lora)
        if time and base:
            parts.append(f"{c.label} takes {time / base:.2f}x {lora.label}'s time per step and "
                         f"{(c.mean('peak_memory_bytes') or 0) / max(lora.mean('peak_memory_bytes') or 1, 1):.2f}x "
                         "its peak memory")
    return (" " + "; ".join(parts) + ".") if parts else ""


def _conclusion(full, lora, bar, key, name) -> str:
    if full is None or lora is None:
        return "this sweep has no full-versus-LoRA pair to decide on."
    if bar is not None and all(_diff(c, bar, "test", key).low <= 0 for c in (full, lora)):
        return (f"fine-tuning is not worth it on this data and budget: neither method beats the bar ({bar.label}) "
                f"beyond the noise.")
    gap = _diff(lora, full, "test", key)
    if not gap.excludes_zero or gap.estimate > 0:
        return (f"LoRA is worth it here: {lora.label} learns as much as full fine-tuning within the measured "
                f"precision ({gap.format(signed=True)} {name}) at a fraction of the cost.")
    return (f"full fine-tuning learns more ({abs(gap.estimate):.1f} {name} [{-gap.high:.1f}, {-gap.low:.1f}] ahead); "
            "LoRA is worth it only where its savings in memory, disk and time matter more than that gap.")
