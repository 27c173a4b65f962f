"""Native decoder vs transformers: logits parity (fp32, max abs diff <= 1e-4) on random checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers

from qatune import load_model

TOL = 1e-4


def _save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    return str(path)


def _gpt2(tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **kw)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    return ref, load_model(_save(ref, tmp_path))


def _llama(tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    return ref, load_model(_save(ref, tmp_path))


GPT2_SHAPES = {
    "gpt2-small-dims": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=64),
    "distilgpt2-like": dict(n_embd=48, n_layer=6, n_head=3, vocab_size=320, n_positions=64),
    "gpt2-medium-like": dict(n_embd=64, n_layer=3, n_head=16, vocab_size=320, n_positions=64),
    "n_inner-and-gelu": dict(n_embd=32, n_layer=2, n_head=2, n_inner=80, activation_function="gelu",
                             vocab_size=320, n_positions=64),
}


@pytest.mark.parametrize("shape", GPT2_SHAPES.values(), ids=GPT2_SHAPES.keys())
def test_gpt2_family_logits_match_transformers(tmp_path, shape):
    ref, model = _gpt2(tmp_path, **shape)
    x = torch.randint(0, 320, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=0, atol=TOL)


@pytest.mark.slow
def test_gpt2_real_dimensions_logits_match(tmp_path):
    """gpt2's real shape (124M parameters), random weights."""
    ref, model = _gpt2(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    x = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_gqa_logits_match_transformers(tmp_path, tie):
    ref, model = _llama(tmp_path, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=320,
                        tie_word_embeddings=tie, rope_theta=100000.0)
    assert model.config.n_kv_head == 2 and model.config.tie_embeddings == tie
    x = torch.randint(0, 320, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_rows(tmp_path, family, side):
    if family == "gpt2":
        _, model = _gpt2(tmp_path, n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=64)
    else:
        _, model = _llama(tmp_path, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
    lengths = [13, 7, 10]
    rows = [torch.randint(2, 320, (n,)) for n in lengths]
    t = max(lengths)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
            alone = model(r[None])[0]
            torch.testing.assert_close(batched[i, sl], alone, rtol=0, atol=TOL)
            assert torch.isfinite(batched[i]).all()  # padding positions too: no NaN from empty attention rows


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_documents_do_not_attend_across_boundaries(tmp_path, family):
    if family == "gpt2":
        _, model = _gpt2(tmp_path, n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=64)
    else:
        _, model = _llama(tmp_path, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
    docs = [torch.randint(2, 320, (n,)) for n in (5, 9, 4)]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids, position_ids=positions)[0]
        start = 0
        for d in docs:
            alone = model(d[None])[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=0, atol=TOL)
            start += len(d)
