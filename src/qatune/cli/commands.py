"""The `qatune` command: train, eval, compare, ask, merge, export, push, download, bench, demo.

Each command is a short function that calls the library; a `QatuneError` (a problem the user can fix) is
printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

from qatune.cli.bench import bench_command
from qatune.cli.demo import run_demo
from qatune.cli.download import download
from qatune.cli.logs import showing_logs
from qatune.cli.parser import build_parser, generation_config
from qatune.compare.run import run_sweep
from qatune.data.prompts import DEFAULT_TEMPLATE, draw_shots, make_prompt_format
from qatune.data.readers import load_examples
from qatune.errors import ConfigError, QatuneError
from qatune.evaluation.measure import evaluate
from qatune.evaluation.multiple_choice import evaluate_multiple_choice
from qatune.generation.answer import answer_questions
from qatune.generation.runs import load_for_inference, run_data_section
from qatune.lora.adapters import load_adapter
from qatune.models.device import usable_device
from qatune.models.loading import load_base_model
from qatune.models.tokenizer import load_tokenizer
from qatune.publish.gguf import export_gguf
from qatune.publish.merge import merge_run
from qatune.publish.push import push_run
from qatune.runs.layout import RunDir
from qatune.training.config import load_config
from qatune.training.recipe import train_model
from qatune.utils.allocator import keep_freed_memory

TRAINING_COMMANDS = ("train", "compare", "demo", "bench")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in TRAINING_COMMANDS:
        keep_freed_memory()  # fewer page faults per training step on CPU (utils/allocator.py)
    try:
        with showing_logs():
            return COMMANDS[args.command](args)
    except QatuneError as e:
        print(f"qatune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk where no writer named the file (StorageError, above, is the usual case)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"qatune: error: cannot write {e.filename or 'a file'}: no space left on device", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qatune: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    config_file = None
    overrides = []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config_file is None:
            config_file = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: give one CONFIG.yaml and key=value overrides")
    train_model(load_config(config_file, overrides))
    return 0


def _eval(args: argparse.Namespace) -> int:
    usable_device(args.device, "--device")  # before anything is read
    if args.out is None and not RunDir(args.source).config.is_file():
        raise ConfigError(f"{args.source} is not a run directory: pass --out DIR for the results")
    if args.task == "mc":  # multiple choice: no generation, no prompt template (the query is the prompt)
        metrics = evaluate_multiple_choice(args.source, args.data, out_dir=args.out, max_examples=args.max_examples,
                                           batch_size=args.batch_size, delimiter=args.mc_delimiter,
                                           device=args.device)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.few_shot and not args.shots_from:
        raise ConfigError("--few-shot needs --shots-from FILE (e.g. the training data)")
    shots = draw_shots(load_examples(args.shots_from), args.few_shot, args.shots_seed) if args.few_shot else []
    metrics = evaluate(args.source, args.data, out_dir=args.out, template=args.template,
                       prompt_format=args.prompt_format, shots=shots,
                       generation=generation_config(args), batch_size=args.batch_size,
                       max_examples=args.max_examples, task=args.task, fmt=args.format, loss=args.loss,
                       device=args.device)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("generation", "template")}, indent=2))
    return 0


def _ask(args: argparse.Namespace) -> int:
    question = " ".join(args.question).strip()
    if not question:  # refused before a model is loaded
        raise ConfigError("the question is empty")
    usable_device(args.device, "--device")
    if args.adapter:
        model = load_base_model(args.model, dtype=args.dtype, device=args.device)
        load_adapter(model, args.adapter)
        tokenizer = load_tokenizer(args.model)
    else:
        model, tokenizer = load_for_inference(args.model, dtype=args.dtype, device=args.device)
    # A run answers in the format it was trained in; a model in its own (auto: its chat template if any).
    run = run_data_section(args.model) or {}
    style = make_prompt_format(args.prompt_format or run.get("prompt_format") or "auto",
                               args.template or run.get("template") or DEFAULT_TEMPLATE, tokenizer)
    streamer = _Streamer(tokenizer)
    answer = answer_questions(model, tokenizer, [question], prompt_format=style, config=generation_config(args),
                              streamer=streamer)[0]
    if streamer.shown.strip() != answer:  # a stop string trimmed the streamed text: show the final answer
        sys.stdout.write("\n" + answer)
    sys.stdout.write("\n")
    return 0


class _Streamer:
    """Prints the answer as its tokens arrive (decoding the whole prefix, so multi-token characters print whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def _print_result(value) -> int:
    print(value)
    return 0


COMMANDS = {
    "train": _train,
    "ask": _ask,
    "eval": _eval,
    "compare": lambda args: _print_result(run_sweep(args.sweep, args.out)),
    "merge": lambda args: _print_result(merge_run(args.run_dir, args.out_dir)),
    "download": lambda args: _print_result(download(args.name)),
    "export": lambda args: _print_result(export_gguf(args.source, args.out, out_type=args.out_type,
                                                     tokenizer=args.tokenizer)),
    "push": lambda args: _print_result(push_run(args.run_dir, args.repo_id, private=args.private,
                                                dry_run=args.dry_run)),
    "bench": bench_command,
    "demo": lambda args: run_demo(out=args.out, epochs=args.epochs),
}
