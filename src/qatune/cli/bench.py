"""`qatune bench ...`: runs the benchmark (`qatune.bench.runner`) and shows its results: the table and the ratios
on stdout (the command's output), the JSON report in `--json`. Progress goes through logging (stderr)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qatune.bench.runner import run_bench
from qatune.bench.setups import BenchConfig


def print_table(report: dict[str, Any], console) -> None:

    table = Table(title=f"qatune bench -- {(report['machine']['gpu'] or {}).get('name') or report['machine']['cpu']}"
                        f", {report['config']['precision']}, batch {report['config']['batch']} x seq "
                        f"{report['config']['seq']}")
    numbers = ("tokens/s", "peak mem", "MFU", "vs hf", "mem vs hf")
    for col in ("shape", "method", "data", "backend", "tokens/s", "step ms (median, min-max)", "peak mem", "MFU",
                "vs hf", "mem vs hf"):
        table.add_column(col, justify="right" if col in numbers else "left")
    for r in report["results"]:
        vs = [x for x in report["ratios"] if x["native"] == r["backend"] and x["baseline"] == "hf"
              and (x["shape"], x["method"], x["strategy"]) == (r["shape"], r["method"], r["strategy"])]
        if r.get("step_s"):
            s = r["step_s"]
            timing = f"{s['median'] * 1e3:,.0f} ({s['min'] * 1e3:,.0f}-{s['max'] * 1e3:,.0f})"
        else:
            timing = r["error"] or r["skipped"] or "-"
        memory = r.get("peak_rss_bytes") or r["peak_memory_bytes"]
        table.add_row(
            r["shape"], r["method"], r["strategy"] or "synthetic", r["backend"],
            f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-", timing,
            f"{memory / 2**20:,.0f} MiB" if memory else "-",
            f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
            f"{vs[0]['ratio']:.2f}x" if vs else "",
            f"{vs[0]['memory_ratio']:.2f}x" if vs and vs[0]["memory_ratio"] else "",
        )
    console.print(table)


def bench_command(args) -> int:
    """`qatune bench ...` (arguments defined in cli/parser.py)."""

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    cfg = BenchConfig(shapes=split(args.shapes), weights=args.weights, isolate=args.isolate,
                      methods=split(args.methods), backends=split(args.backends),
                      batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                      precision=args.precision, device=args.device, n_layer=args.n_layer,
                      real_data=args.real_data, strategies=split(args.strategies), tokenizer=args.tokenizer,
                      threads=args.threads, seed=args.seed)
    console = Console(width=None if Console().is_terminal else 200)
    report = run_bench(cfg)
    print_table(report, console)
    for r in report["ratios"]:
        memory = f", {r['memory_ratio']:.2f}x peak memory" if r["memory_ratio"] else ""
        console.print(f"{r['shape']}/{r['method']}{'/' + r['strategy'] if r['strategy'] else ''}: "
                      f"{r['native']} / {r['baseline']} = {r['ratio']:.2f}x tokens/s{memory}", highlight=False)
    for r in report["compile_ratios"]:
        console.print(f"{r['shape']}/{r['method']}{'/' + r['strategy'] if r['strategy'] else ''}: "
                      f"{r['compiled']} / {r['eager']} = {r['ratio']:.2f}x tokens/s", highlight=False)
    for r in report["strategy_ratios"]:
        console.print(f"{r['shape']}/{r['method']}/{r['backend']}: {r['strategy']} / pad-to-longest = "
                      f"{r['ratio']:.2f}x tokens/s", highlight=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        console.print(f"wrote {args.json}", highlight=False)
    return 0
