"""`qatune bench` and the native fast path it measures.

The benchmark runs on the `tiny` shape on CPU for a couple of steps: what is checked is the shape of the
results (every configuration present, well-formed), never a timing. The fast path (`Decoder(fast_path=True)`)
is checked against the reference path piece by piece and over 50 training steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config

from qatune.bench import BenchConfig, fast_path_agreement, run_bench, sdpa_kernels
from qatune.bench.setups import build_hf, build_native, gpt2_config, random_native_state
from qatune.cli.commands import main
from qatune.lora import LoRAConfig, apply_lora
from qatune.models import decoder as model_mod
from qatune.models import fast_ops
from qatune.models.config import from_hf_config
from qatune.models.decoder import Decoder
from qatune.models.fast_ops import chunked_lm_loss, explicit_attention, fast_dropout

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """The benchmark's --threads sets a process-wide value: put it back for the other tests."""
    before = torch.get_num_threads()
    yield "1"
    torch.set_num_threads(before)


def test_bench_cli_writes_every_configuration_as_json(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shapes", "tiny", "--methods", "full,lora", "--backends", "native,native-fast,hf",
                 "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--threads", one_thread, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    names = {r["name"] for r in report["results"]}
    assert names == {f"tiny/{m}/{b}" for m in ("full", "lora") for b in ("native", "native-fast", "hf")}
    for r in report["results"]:
        assert r["error"] is None and r["skipped"] is None, r["name"]
        assert len(r["times_s"]) == 2 and len(r["warmup_s"]) == 1 and r["tokens"] == [64, 64]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["step_s"]["min"] <= r["step_s"]["median"]
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["peak_memory_bytes"] is None  # CPU: not measured, said so in peak_memory_note
        lora = r["method"] == "lora"
        assert (r["params"]["trainable"] < r["params"]["total"] / 100) == lora
    assert report["peak_memory_note"] and report["peak_flops"] > 0
    assert {(x["method"], x["native"], x["baseline"]) for x in report["ratios"]} == {
        (m, b, "hf") for m in ("full", "lora") for b in ("native", "native-fast")}
    assert {"torch", "transformers", "peft", "qatune"} <= set(report["machine"]["versions"])
    assert report["machine"]["date"] and report["machine"]["cpu"]


@pytest.mark.slow
def test_bench_compile_backends(one_thread):
    """torch.compile on CPU takes about 90 s for the tiny shape with a cold inductor cache (seconds when warm)."""
    report = run_bench(BenchConfig(shapes=["tiny"], methods=["lora"], backends=["native-compile", "hf-compile"],
                                   batch=2, seq=32, steps=1, warmup=1, device="cpu", threads=1))
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in report["results"])


def test_bench_real_data_compares_padding_and_packing(one_thread):
    if not (SHARED / "data" / "triviaqa").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    report = run_bench(BenchConfig(shapes=["tiny"], methods=["lora"], backends=["native", "hf"], batch=4, seq=128,
                                   steps=1, warmup=1, device="cpu",
                                   real_data=str(SHARED / "data" / "triviaqa" / "triviaqa_sm_sub.jsonl"),
                                   tokenizer=str(SHARED / "tokenizers" / "gpt2"), threads=1))
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["tiny/lora/hf/packing"]["skipped"].startswith("packing needs backend=native")
    for strategy in ("pad-to-longest", "dynamic", "packing"):
        assert by_name[f"tiny/lora/native/{strategy}"]["tokens_per_s"] > 0
        assert "mfu" not in by_name[f"tiny/lora/native/{strategy}"]  # answer-only labels: no model-FLOPs MFU
    eff = report["real_data"]["padding_efficiency"]
    assert eff["pad-to-longest"] < eff["dynamic"] < eff["packing"] <= 1
    assert {x["strategy"] for x in report["strategy_ratios"] if x["backend"] == "native"} == {"dynamic", "packing"}


def test_gpu_check_functions_run_on_cpu(one_thread):
    """benchmarks/gpu_check.sh calls these on CUDA, where no test runs: here they must at least work."""
    torch.set_num_threads(int(one_thread))
    agreement = fast_path_agreement("tiny", steps=3, batch=2, seq=32, device="cpu")
    assert set(agreement["max_rel_diff"]) == {"full", "lora"} and max(agreement["max_rel_diff"].values()) < 2e-2
    kernels = sdpa_kernels("cpu", seq=64)
    assert any("scaled_dot_product" in name for name in kernels["native"] + kernels["hf"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_backend_starts_from_the_same_weights(method):
    hf_config = gpt2_config("tiny", None, 32)
    state = random_native_state(hf_config, CPU, seed=0)
    ids = torch.randint(0, hf_config.vocab_size, (2, 32))
    batch = {"input_ids": ids, "labels": ids}
    native, hf = build_native(hf_config, state, CPU, method).eval(), build_hf(hf_config, state, CPU, method).eval()
    with torch.no_grad():
        torch.testing.assert_close(native.loss(batch)[0], hf.loss(batch)[0], rtol=1e-5, atol=1e-5)


def test_fast_dropout_keeps_one_minus_p_and_scales():
    x = torch.ones(1_000_000, requires_grad=True)
    y = fast_dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask/0.9)/dx = mask/0.9


@pytest.mark.parametrize("padded", [False, True])
def test_explicit_attention_matches_sdpa(padded):
    q, k, v = torch.randn(3, 2, 4, 9, 16).unbind(0)
    mask = model_mod.attention_mask_4d(2, 9, 0, CPU, torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), None) \
        if padded else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(explicit_attention(q, k, v, mask, 0.0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_lm_loss_matches_cross_entropy(monkeypatch, label_smoothing):
    monkeypatch.setitem(fast_ops._LOSS_CHUNK_ELEMENTS, "cpu", 7 * 50)  # 7 rows per chunk: several chunks
    hidden = torch.randn(30, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    loss = chunked_lm_loss(hidden, weight, targets, label_smoothing)
    loss.mul(0.5).backward()
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    expected = F.cross_entropy(h @ w.t(), targets, reduction="sum", label_smoothing=label_smoothing)
    expected.mul(0.5).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, h.grad)
    torch.testing.assert_close(weight.grad, w.grad)


def _train_losses(model: Decoder, batches: list[dict[str, torch.Tensor]], dtype: torch.dtype | None) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for batch in batches:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("dtype, rtol", [(None, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fast_path_losses_follow_the_reference_over_50_steps(method, dtype, rtol, one_thread):
    """Dropout off: with it the fast path draws other masks (another random stream), by design."""
    torch.set_num_threads(int(one_thread))
    torch.manual_seed(0)
    cfg = from_hf_config(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, resid_pdrop=0, embd_pdrop=0,
                                    attn_pdrop=0, bos_token_id=0, eos_token_id=0).to_dict())
    reference = Decoder(cfg)
    reference.init_weights()
    if method == "lora":
        apply_lora(reference, LoRAConfig(r=8, alpha=16, dropout=0.0, targets=["c_attn"]))
    fast = Decoder(cfg, fast_path=True)  # the same weights, LoRA's included, built with the fast path
    if method == "lora":
        apply_lora(fast, LoRAConfig(r=8, alpha=16, dropout=0.0, targets=["c_attn"]))
    fast.load_state_dict(reference.state_dict())
    data = torch.randint(0, 500, (4, 4, 48))  # 4 batches, cycled: the loss must fall
    batches = []
    for i in range(50):
        ids = data[i % 4]
        labels = ids.clone()
        labels[:, :16] = -100  # prompt positions, as answer-only QA labels
        batches.append({"input_ids": ids, "labels": labels})
    ref_losses = _train_losses(reference.train(), batches, dtype)
    fast_losses = _train_losses(fast.train(), batches, dtype)
    assert ref_losses[0] - ref_losses[-1] > 0.05  # it trains (LoRA on a random base learns slowly)
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=rtol, atol=0)
