"""The `qatune` command line: every command, its arguments and their help."""

from __future__ import annotations

import argparse

from qatune import __version__
from qatune.data.prompts import PROMPT_FORMATS
from qatune.generation.decode import GenerationConfig
from qatune.training.config import describe_keys

EPILOG = """examples:
  qatune demo                                        # LoRA-tune SmolLM2-135M on the built-in QA facts
  qatune train configs/gpt2-lora.yaml data.train=my.jsonl out=runs/mine
  qatune ask smollm2-135m "What is the capital of France?"
  qatune ask runs/mine "Who wrote Hamlet?"
  qatune eval runs/mine --data test.jsonl
  qatune merge runs/mine merged/
  qatune export runs/mine mine.gguf --type q8_0       # for llama.cpp / Ollama / LM Studio
"""


def _at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (a count, a size), refused by argparse otherwise -- so that
    `--max-examples -1` cannot become a Python slice that drops the last example."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                            length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                            do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fine-tune GPT-2-family and other small causal LMs on question-answer data, full or LoRA.")
    parser.add_argument("--version", action="version", version=f"qatune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_ask, _add_eval, _add_compare, _add_merge, _add_download, _add_bench, _add_demo):
        add(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (full or LoRA)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train from a YAML config plus dotted key=value overrides "
                                   "(e.g. lora.r=16 train.lr=1e-4). Presets: configs/*.yaml.",
                       epilog="keys and defaults (None: chosen by method or model, see README):\n" + describe_keys())
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer a question with a model or a run directory")
    p.add_argument("model", help="model source (dir, hub id, .gguf, smollm2-135m) or a qatune run directory")
    p.add_argument("question", nargs="+")
    p.add_argument("--adapter", help="LoRA adapter directory (peft format) applied to the model")
    p.add_argument("--template", default=None, help="plain prompt template (default: the run's, else the QA default)")
    style = p.add_mutually_exclusive_group()
    style.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                       help="default: the run's; for a model auto (its chat template when it has one)")
    style.add_argument("--chat", dest="prompt_format", action="store_const", const="chat",
                       help="same as --prompt-format chat")
    style.add_argument("--no-chat", dest="prompt_format", action="store_const", const="plain",
                       help="same as --prompt-format plain")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    _add_generation_args(p)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure a run or a model on held-out data (loss, EM/F1 or BLEU...)",
                       description="Teacher-forced answer loss and perplexity, then generated answers scored as QA "
                                   "(EM, F1) or NLG (BLEU, ROUGE-L, NIST, METEOR, CIDEr). Writes metrics.json and "
                                   "predictions.jsonl to --out (default RUN_DIR/eval).")
    p.add_argument("source", metavar="RUN_DIR_OR_MODEL")
    p.add_argument("--data", required=True, help="data file (any format `train` reads), or sample-test")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval; required for a model)")
    p.add_argument("--format", default="auto", help="data format: auto | jsonl | json | csv | e2e | hf")
    p.add_argument("--max-examples", type=_at_least(1), default=None,
                   help="first N examples (NLG: first N distinct inputs)")
    p.add_argument("--task", default="auto", choices=["auto", "qa", "nlg", "mc"],
                   help="auto: E2E data is nlg, else qa; mc: multiple choice (query/choices/gold JSONL), acc and "
                        "acc_norm by choice log-likelihood")
    p.add_argument("--mc-delimiter", default="\nAnswer: ",
                   help="--task mc: text between query and choice (default: llm-foundry's '\\nAnswer: '; "
                        "in bash pass a newline as $'\\n...')")
    p.add_argument("--template", default=None, help="prompt template (default: the run's, else the QA default)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                   help="default: the run's; for a model auto (its chat template when it has one)")
    p.add_argument("--few-shot", type=_at_least(0), default=0, metavar="K",
                   help="put K solved examples (from --shots-from, drawn with --shots-seed) before each question")
    p.add_argument("--shots-from", default=None, metavar="FILE", help="where few-shot examples come from")
    p.add_argument("--shots-seed", type=int, default=0)
    p.add_argument("--batch-size", type=_at_least(1), default=16)
    p.add_argument("--no-loss", dest="loss", action="store_false", help="skip the teacher-forced loss")
    p.add_argument("--device", default=None)
    _add_generation_args(p)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="run a full-vs-LoRA sweep and write report.md with tables, plots, verdict")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("--out", default=None, help="output directory (default runs/compare/<sweep name>)")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA run into a standalone Hugging Face checkpoint")
    p.add_argument("run_dir")
    p.add_argument("out_dir")


def _add_download(sub) -> None:
    p = sub.add_parser("export", help="write a run (LoRA merged) or a model as one GGUF file for llama.cpp / Ollama",
                       description="A LoRA run is merged first; a full fine-tuning run or any model qatune loads "
                                   "(GPT-2 or Llama family) works too. The tokenizer and its chat template go in "
                                   "the file.")
    p.add_argument("source", metavar="RUN_OR_MODEL")
    p.add_argument("out", metavar="OUT.gguf")
    p.add_argument("--type", dest="out_type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type of the matrices (norms and biases stay f32); default f16")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the run's or the model's own)")

    p = sub.add_parser("push", help="upload a run's adapter or model (with its model card) to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("repo_id", metavar="REPO_ID", help="user/name on the Hub (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="list the files and check the model card; upload nothing")

    p = sub.add_parser("download", help="fetch a model ahead of time (smollm2-135m from PyPI, others from the hub)")
    p.add_argument("name")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="training throughput: native vs transformers(+peft), measured alternately",
                       description="Random-initialised GPT-2 shapes, every configuration in one process, measured "
                                   "in alternating rounds. See benchmarks/README.md.")
    p.add_argument("--shapes", default="gpt2", help="comma list of tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                   "tiny-llama, smollm2-135m")
    p.add_argument("--weights", default="random", choices=["random", "real"],
                   help="real: the shape's released weights (smollm2-135m: the installed SmolLM2-135M-Instruct)")
    p.add_argument("--isolate", default=None, action=argparse.BooleanOptionalAction,
                   help="one process per configuration, for its peak RSS (default: on CPU)")
    p.add_argument("--methods", default="full,lora", help="comma list of full, lora, dora")
    p.add_argument("--backends", default="native,native-fast,hf",
                   help="comma list of native, native-fast, native-compile, native-fast-compile, hf, hf-compile")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512, help="tokens per row (synthetic) / max_length (real data)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per configuration (>= 1)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--n-layer", type=_at_least(1), default=None, help="override the shapes' depth (quick CPU runs)")
    p.add_argument("--real-data", default=None, metavar="FILE",
                   help="a QA file (e.g. TriviaQA JSONL): compare padding and packing on real lengths")
    p.add_argument("--strategies", default="pad-to-longest,dynamic,packing", help="real-data batching strategies")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer for --real-data (hub id or directory)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write the full results (raw step times) here")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="LoRA-tune SmolLM2-135M on the built-in QA facts; before/after answers")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=_at_least(1), default=None)


