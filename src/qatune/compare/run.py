"""`qatune compare SWEEP.yaml`: carry a sweep out, then write results.json and report.md.

    prepare    every run's train config built and validated before anything is written (a typo fails now, not
               in an hour; a bad sweep leaves no trace), every path checked to lie inside OUT; then, under
               OUT's lock (one sweep at a time), the slices and configs written
    select     each configuration's grid points trained with the first seed; the best validation metric picks
    train      the picked points trained with the remaining seeds
    evaluate   baselines and picked runs scored on the test set and every `extra_eval` set
    report     results.json (per-item scores included) -> report.md, plots and the verdict

Each training runs in its own `python -m qatune train` process, so a killed sweep leaves only files that `train`
itself leaves consistent (atomic checkpoints, summary.json written last), and every run's peak memory is its own.
Resuming is rerunning: a trained run (summary.json) is never trained again, an evaluation with its metrics.json
is never redone, a run with checkpoints but no summary resumes from its last checkpoint (exact), as long as the
sweep still gives them the same settings (`provenance.py`): an evaluation made with other settings or data is
made again, a run trained with another config or slice is refused before anything is written.

Layout under OUT: `data/` (slices), `configs/NAME.yaml`, `runs/NAME/` (train's run directory, `eval/` for the
test set, `eval-<extra>/` for each extra set, `train.log`), `trainings.json` (the data each run trained on),
`selection.json`, `sweep.json` (wall time of each invocation), `results.json`, `report.md` and the plots.
"""

from __future__ import annotations

import ctypes
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from qatune.compare.provenance import (
    evaluation_spec,
    is_current,
    record_spec,
    record_training_inputs,
    refuse_changed_trainings,
)
from qatune.compare.report import write_report
from qatune.compare.results import collect_results, selection_value
from qatune.compare.sweep import (
    VALIDATION,
    ExtraEval,
    Point,
    Run,
    Sweep,
    confined,
    load_sweep,
    point_dict,
    slice_paths,
    substitute,
    write_slices,
)
from qatune.data.prompts import draw_shots
from qatune.data.readers import load_examples, resolve_data, split_train_val
from qatune.errors import ConfigError, QatuneError
from qatune.evaluation.measure import evaluate, resolve_task, validation_generation
from qatune.evaluation.multiple_choice import evaluate_multiple_choice
from qatune.generation.decode import GenerationConfig
from qatune.models.tokenizer import load_tokenizer
from qatune.runs.layout import RunDir, lock_directory
from qatune.training.config import DataSection, config_from_dict
from qatune.utils.io import atomic_write_text

_MAX_FILE_NAME_BYTES = 255 - len(".") - len(".tmp-12345678")  # room for an atomic write's temporary: .NAME.tmp-XXXXXXXX
logger = logging.getLogger(__name__)


def run_sweep(path: str | Path, out: str | Path | None = None) -> Path:
    """Run (or resume) every run of the sweep, then write results.json and report.md; returns the report path."""
    started = time.time()
    sweep = load_sweep(path)
    out = Path(out or Path("runs") / "compare" / sweep.name)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a directory")
    configs = prepare(sweep, out)
    with lock_directory(out, "comparison directory"):
        return _carry_out(sweep, out, configs, started)


def _carry_out(sweep: Sweep, out: Path, configs: dict[str, dict[str, Any]], started: float) -> Path:
    refuse_changed_trainings(sweep, out, configs)  # under the lock, before the first write
    write_inputs(sweep, out, configs)
    _record_invocation(out / "sweep.json", started)  # counted from its start, even if it is killed at once
    try:
        for run in sweep.candidates():
            ensure_trained(out, run, configs[run.name], started)
        picks = select(sweep, out)
        finals = sweep.finals(picks)
        for run in finals:
            ensure_trained(out, run, configs[run.name], started)
        evaluations = sweep.baselines() + finals
        for i, run in enumerate(evaluations, start=1):
            ensure_evaluated(sweep, out, run, f"[{i}/{len(evaluations)}] {run.name}", started)
    finally:
        _record_invocation(out / "sweep.json", started)
    results = collect_results(sweep, out, picks)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    report = write_report(results, out)
    logger.info(f"report: {report}")
    return report


def prepare(sweep: Sweep, out: Path) -> dict[str, dict[str, Any]]:
    """`slice:` names replaced by their files' paths and every run's train config built and validated; nothing
    is written (a typo fails now, not in an hour, and leaves no trace). Returns the configs by run name."""
    _check_file_names(sweep)
    _drop_missing_chat(sweep)
    paths = slice_paths(sweep, confined(out, "data"))
    sweep.base, sweep.eval = substitute(sweep.base, paths), substitute(sweep.eval, paths)
    sweep.extra_eval = substitute(sweep.extra_eval, paths)
    configs = {}
    for run in sweep.every_trainable():
        confined(out, "configs", f"{run.name}.yaml")
        configs[run.name] = sweep.train_config(run, confined(out, "runs", run.name))
        config_from_dict(configs[run.name]).resolved()
    return configs


def _drop_missing_chat(sweep: Sweep) -> None:
    """Unless the sweep lists the baselines' formats itself, a model whose tokenizer has no chat template is
    asked in the plain format only."""
    if sweep.formats_declared:
        return
    for model in sweep.models if sweep.zero_shot or sweep.few_shot else []:
        if not getattr(load_tokenizer(model), "chat_template", None):
            sweep.baseline_formats[model] = [f for f in sweep.baseline_formats[model] if f != "chat"]


def _check_file_names(sweep: Sweep) -> None:
    """Every file name the sweep makes from its runs, slices and extra sets fits the file system (255 bytes, with
    room for the temporary name of an atomic write), checked before the first write: a long name must not fail
    an hour into the sweep. Run names bound themselves (`bounded_name`); slice and extra-set names are the user's."""
    names = [(f"run {run.name}", f"{run.name}.yaml") for run in sweep.every_trainable() + sweep.baselines()]
    names += [(f"slice {name}", f"{name}{Path(resolve_data(spec.source)).suffix}")
              for name, spec in sweep.slices.items()]
    names += [(f"extra_eval {spec.name}", RunDir(Path()).eval_named(spec.name).path.name)
              for spec in sweep.extra_eval]
    for what, file_name in names:
        if len(file_name.encode("utf-8")) > _MAX_FILE_NAME_BYTES:
            raise ConfigError(f"{sweep.path}: the file name of {what[:60]}... is {len(file_name.encode('utf-8'))} "
                              f"bytes long, more than a file system allows ({_MAX_FILE_NAME_BYTES}); shorten it")


def write_inputs(sweep: Sweep, out: Path, configs: dict[str, dict[str, Any]]) -> None:
    """The slices and each run's train config, once the whole sweep has been validated."""
    write_slices(sweep, out / "data")
    for name, config in configs.items():
        atomic_write_text(out / "configs" / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))


def ensure_trained(out: Path, run: Run, config: dict[str, Any], started: float) -> None:
    run_dir = out / "runs" / run.name
    if RunDir(run_dir).summary.is_file():
        return
    logger.info(f"{run.name}: training (log: {run_dir / 'train.log'})")
    record_training_inputs(out, run.name, config)  # what it reads, for a rerun to compare with
    _train(out / "configs" / f"{run.name}.yaml", run_dir)
    _record_invocation(out / "sweep.json", started)


def select(sweep: Sweep, out: Path) -> dict[tuple[str, str, int | None], Point]:
    """Each configuration's grid point with the best validation metric (first seed); ties go to the earlier
    point. Only validation is read: the test set scores the picks and nothing else. Written to selection.json,
    with the best validation loss of every point beside a generation metric (where the two disagree shows)."""
    picks, record = {}, []
    for cell in sweep.cells():
        scored = []
        for run in (r for r in sweep.candidates() if r.cell == cell):
            run_dir = out / "runs" / run.name
            value = selection_value(run_dir, sweep.select_metric)
            scored.append((run, value))
            record.append({"run": run.name, "point": point_dict(run.point), sweep.select_metric: value,
                           "val_loss": selection_value(run_dir, "val_loss")})
        picks[cell] = pick_point(scored, higher_is_better=sweep.selects_on_answers)
    atomic_write_text(out / "selection.json", json.dumps({"metric": sweep.select_metric, "candidates": record,
                                                          "picked": [r.name for r in sweep.finals(picks)]},
                                                         indent=2) + "\n")
    return picks


def pick_point(scored: list[tuple[Run, float | None]], *, higher_is_better: bool) -> Point:
    """The point of the best-scoring run; runs without a (finite) validation value cannot be picked."""
    usable = [(run, value) for run, value in scored if value is not None and value == value]
    if not usable:
        raise QatuneError(f"no validation metric for any of {[run.name for run, _ in scored]}: the selection "
                          "needs data.val or data.val_fraction > 0 (and train.eval_generate for em/f1/bleu)")
    best = max(usable, key=lambda rv: rv[1]) if higher_is_better else min(usable, key=lambda rv: rv[1])
    return best[0].point


def ensure_evaluated(sweep: Sweep, out: Path, run: Run, tag: str, started: float) -> None:
    """The test set (run_dir/eval) and every extra set (run_dir/eval-NAME), each skipped when already done with
    the settings the sweep gives now; one done with other settings is removed and made again."""
    run_dir = RunDir(out / "runs" / run.name)
    todo = [(run_dir.eval, _test_call(sweep, run, run_dir))]
    if not run.trained:  # a trained run's validation answers are in its metrics.jsonl
        todo.append((run_dir.eval_named(VALIDATION), _validation_call(sweep, run)))
    todo += [(run_dir.eval_named(spec.name), _extra_call(sweep, run, run_dir, spec)) for spec in sweep.extra_eval
             if run.method != "k-shot"]  # k-shot is a baseline of the test task only
    jobs = [(where, function, kwargs, evaluation_spec(function.__name__, kwargs)) for where, (function, kwargs) in todo]
    missing = [job for job in jobs if not is_current(job[0], job[3])]
    if not missing:
        logger.info(f"{tag}: done, skipped")
        return
    for where, function, kwargs, spec in missing:
        stale = where.path.exists()
        again = " (again: the sweep's settings changed)" if stale else ""
        logger.info(f"{tag}: evaluating on {kwargs['data']}{again}")
        where.discard()  # nothing of an evaluation made with other settings survives into this one
        function(**kwargs, out_dir=where.path, progress=False)
        record_spec(where, spec)
        _record_invocation(out / "sweep.json", started)


def _source(run: Run, run_dir: RunDir) -> str | Path:
    return run_dir.path if run.trained else run.model


def _test_call(sweep: Sweep, run: Run, run_dir: RunDir) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A trained run in its own prompt format and max_length; a baseline in the sweep's (auto: the model's own)."""
    ev, data = sweep.eval, sweep.base.get("data", {})
    shots = _shots(sweep) if run.method == "k-shot" else []
    return evaluate, dict(
        source=_source(run, run_dir), data=ev.data,
        template=ev.template or (None if run.trained else data.get("template")),
        prompt_format=ev.prompt_format or run.prompt_format,
        shots=shots, max_length=None if run.trained else data.get("max_length"),
        generation=GenerationConfig(**ev.generation), batch_size=ev.batch_size,
        max_examples=ev.max_examples, task=ev.task, fmt=ev.format,
        loss=ev.loss)


def _validation_call(sweep: Sweep, run: Run) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A baseline answers the validation questions the trainings answer (base.data.val, or the questions
    `val_fraction` holds out with the first seed), decoded as they are, so that the best baseline by validation
    is the bar every fine-tune must clear."""
    data = sweep.base.get("data", {})
    fraction = data.get("val_fraction", DataSection.val_fraction)
    if not data.get("val") and not fraction > 0:
        raise ConfigError(f"{sweep.path}: the baselines are compared on the validation set, and the sweep has none "
                          "(base.data.val, or base.data.val_fraction > 0)")
    source, fmt = data.get("val") or data["train"], data.get("format", "auto")
    split = None if data.get("val") else (fraction, sweep.seeds[0])
    task = resolve_task(sweep.eval.task, sweep.eval.format, sweep.eval.data)
    shots = _shots(sweep) if run.method == "k-shot" else []
    return evaluate, dict(
        source=run.model, data=source, template=data.get("template"), prompt_format=run.prompt_format, shots=shots,
        generation=validation_generation(task), batch_size=sweep.eval.batch_size, max_examples=sweep.select_examples,
        task=task, fmt=fmt, loss=False, split=split)


def _extra_call(sweep: Sweep, run: Run, run_dir: RunDir,
                spec: ExtraEval) -> tuple[Callable[..., Any], dict[str, Any]]:
    if spec.task == "mc":
        return evaluate_multiple_choice, dict(source=_source(run, run_dir), data=spec.data,
                                              max_examples=spec.max_examples,
                                              batch_size=spec.batch_size)
    data = sweep.base.get("data", {})
    return evaluate, dict(
        source=_source(run, run_dir), data=spec.data, template=None if run.trained else data.get("template"),
        prompt_format=run.prompt_format,
        generation=GenerationConfig(**sweep.eval.generation),
        batch_size=spec.batch_size, max_examples=spec.max_examples, task=spec.task,
        fmt=spec.format, loss=False)


def _shots(sweep: Sweep) -> list:
    """The k-shot baseline's solved examples: k training examples drawn with the first seed, never one of the
    validation questions the baselines are compared on."""
    data = sweep.base.get("data", {})
    if "train" not in data:
        raise ConfigError(f"{sweep.path}: few_shot draws its examples from base.data.train, which is not set")
    examples = load_examples(data["train"], fmt=data.get("format", "auto"))
    if not data.get("val"):
        examples = split_train_val(examples, data.get("val_fraction", DataSection.val_fraction), sweep.seeds[0])[0]
    return draw_shots(examples, sweep.few_shot, sweep.seeds[0])


def _train(config_path: Path, run_dir: Path) -> None:
    """`python -m qatune train` in a child process; resumes from the run's checkpoints when it has any."""
    args = [sys.executable, "-m", "qatune", "train", str(config_path)]
    previous = RunDir(run_dir)
    if previous.checkpoints.is_dir() or previous.config.is_file():  # started before: continue it
        args.append("resume=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:
        code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None).returncode
    if code != 0:
        tail = "".join((run_dir / "train.log").read_text().splitlines(keepends=True)[-15:])
        raise QatuneError(f"training {run_dir.name} failed (exit {code}); end of {run_dir / 'train.log'}:\n{tail}")


def _die_with_parent() -> None:
    """Linux: the training child is killed when the sweep process dies, so a killed sweep leaves no orphan
    still writing into a run directory that the next invocation will resume."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _record_invocation(path: Path, started: float) -> None:
    """This invocation's wall time so far, updated after every training and evaluation: the report states the
    sweep's total wall time even when it took several invocations (a killed one counts up to its last
    finished step)."""
    record = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    stamp = datetime.fromtimestamp(started, timezone.utc).isoformat()
    record["invocations"] = [i for i in record["invocations"] if i["started"] != stamp]
    record["invocations"].append({"started": stamp, "elapsed_s": time.time() - started})
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
