"""Generation against transformers as the reference, on tiny random GPT-2 and Llama (GQA) checkpoints.

Greedy and beam search must give transformers' tokens exactly; each row of a left-padded batch is compared
with transformers on that prompt alone. Sampling cannot match transformers' random draws, so its filters are
checked directly against transformers' warpers and the sampler for reproducibility and for the top-k set.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qatune import QatuneError, load_model
from qatune.generation.decode import (
    GenerationConfig,
    ban_repeated_ngrams,
    generate,
    generate_text,
    top_k_filter,
    top_p_filter,
    warp_logits,
)
from qatune.models.decoder import KVCache

FAMILIES = ["gpt2", "llama"]
PROMPTS = [[5, 17, 200, 33], [44, 9, 120, 7, 250, 61, 3, 99, 180], [300, 12, 77, 150, 8, 230]]


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tiny_gpt2_dir, tiny_llama_dir):
    """(native model, transformers model) loaded from the same checkpoint."""
    from transformers import AutoModelForCausalLM

    path = tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir
    return load_model(path), AutoModelForCausalLM.from_pretrained(path).eval()


def hf_new_tokens(hf, prompt: list[int], eos: int, **kwargs) -> list[int]:
    """transformers' continuation of one unpadded prompt, cut at the first EOS (which it keeps)."""
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, eos_token_id=eos, pad_token_id=0, **kwargs)[0, len(prompt):].tolist()
    return out[: out.index(eos)] if eos in out else out


def emitted_token(model, prompt: list[int], position: int) -> int:
    """A token greedy decoding really produces: used as EOS, so that stopping at EOS is exercised."""
    return generate(model, [prompt], GenerationConfig(max_new_tokens=position + 1, eos_token_id=[]))[0][position]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kv_cache_decoding_matches_full_forward(family, dtype, tiny_gpt2_dir, tiny_llama_dir):
    """Prefill + one token per step with the cache, on a left-padded batch, equals one forward without cache.

    float64 shows the two paths compute the same function (1e-10); in float32 the scaled-up test weights give
    logits of ~15, so the 1e-5 bound is relative to the largest logit (a few float32 ulps)."""
    model = load_model(tiny_gpt2_dir if family == "gpt2" else tiny_llama_dir, dtype=dtype)
    steps = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    ids = torch.tensor([[0, 0, 0, 5, 17, 200], [44, 9, 120, 7, 250, 61]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    full_mask = torch.cat((mask, torch.ones_like(steps)), dim=1)
    with torch.inference_mode():
        full = model(torch.cat((ids, steps), dim=1), attention_mask=full_mask)
        cache = KVCache(model.config.n_layer)
        cached = [model(ids, attention_mask=mask, kv_cache=cache)]
        for t in range(steps.shape[1]):
            cached.append(model(steps[:, t : t + 1], attention_mask=full_mask[:, : 7 + t], kv_cache=cache))
    bound = 1e-10 if dtype == torch.float64 else 1e-5 * full.abs().max().item()
    torch.testing.assert_close(torch.cat(cached, dim=1), full, rtol=0, atol=bound)


def test_greedy_matches_transformers_in_a_padded_batch(models):
    model, hf = models
    eos = emitted_token(model, PROMPTS[0], 5)
    ours = generate(model, PROMPTS, GenerationConfig(max_new_tokens=24, eos_token_id=eos))
    for prompt, out in zip(PROMPTS, ours):
        assert out == hf_new_tokens(hf, prompt, eos, max_new_tokens=24)
    assert len(ours[0]) == 5  # stopped at EOS, EOS itself not returned
    assert max(len(o) for o in ours) == 24  # ... while another row ran to max_new_tokens


def test_greedy_no_repeat_ngram_matches_transformers(models):
    model, hf = models
    cfg = GenerationConfig(max_new_tokens=24, no_repeat_ngram_size=2, eos_token_id=2)
    for prompt, out in zip(PROMPTS, generate(model, PROMPTS, cfg)):
        assert out == hf_new_tokens(hf, prompt, 2, max_new_tokens=24, no_repeat_ngram_size=2)


@pytest.mark.parametrize(
    "num_beams, length_penalty, no_repeat_ngram_size, early_stopping",
    [(10, 0.9, 4, False), (4, 1.0, 0, False), (4, 1.0, 0, True), (3, 2.0, 0, "never")],
)
def test_beam_search_matches_transformers(models, num_beams, length_penalty, no_repeat_ngram_size, early_stopping):
    model, hf = models
    eos = emitted_token(model, PROMPTS[0], 3)
    settings = dict(num_beams=num_beams, length_penalty=length_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=early_stopping, max_new_tokens=16)
    ours = generate(model, PROMPTS, GenerationConfig(eos_token_id=eos, **settings))
    for prompt, out in zip(PROMPTS, ours):
        assert out == hf_new_tokens(hf, prompt, eos, **settings)


def test_beam_search_finishes_hypotheses_at_eos(models):
    """With an EOS the model often emits, some best hypotheses end before max_new_tokens (the pool path)."""
    model, hf = models
    eos = emitted_token(model, PROMPTS[0], 1)
    settings = dict(num_beams=4, length_penalty=1.0, max_new_tokens=16)
    ours = generate(model, PROMPTS, GenerationConfig(eos_token_id=eos, **settings))
    assert ours == [hf_new_tokens(hf, p, eos, **settings) for p in PROMPTS]
    assert min(len(o) for o in ours) < 16


# Cases where the pool rules decide the answer (checked by breaking each rule: the test then fails): only the
# first num_beams candidates may finish; with early_stopping=True a full pool takes no more hypotheses while
# other prompts of the batch go on; "never" judges live beams at the maximum length.
POOL_CASES = [("gpt2", 2, 2, 1.0, True), ("gpt2", 7, 2, 3.0, "never"), ("llama", 4, 4, 0.5, False)]


@pytest.mark.parametrize("family, eos_position, num_beams, length_penalty, early_stopping", POOL_CASES)
def test_beam_search_pool_rules_match_transformers(
    family, eos_position, num_beams, length_penalty, early_stopping, tiny_gpt2_dir, tiny_llama_dir
):
    from transformers import AutoModelForCausalLM

    path = tiny_gpt2_dir if family == "gpt2" else tiny_llama_dir
    model, hf = load_model(path), AutoModelForCausalLM.from_pretrained(path).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 320, (6, 7), generator=generator)  # equal lengths: one unpadded HF batch
    eos = emitted_token(model, prompts[0].tolist(), eos_position)
    settings = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                    max_new_tokens=24)
    ours = generate(model, prompts, GenerationConfig(eos_token_id=eos, **settings))
    theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, eos_token_id=eos,
                         pad_token_id=0, **settings)[:, prompts.shape[1]:].tolist()
    assert ours == [row[: row.index(eos)] if eos in row else row for row in theirs]


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    logits[0, :10] = 1.0  # ties at the top-k boundary and inside the top-p set
    logits[1] = 0.0  # a uniform row: top-p must still keep at least one token
    for k in (1, 5, 12, 50, 80):
        for keep in (1, 3):
            expected = TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, logits)
            assert torch.equal(top_k_filter(logits, k, keep), expected)
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        for keep in (1, 3):
            expected = TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, logits)
            assert torch.equal(top_p_filter(logits, p, keep), expected)
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    assert torch.equal(warp_logits(logits, cfg), hf(None, logits))


def test_ngram_ban_matches_transformers():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    torch.manual_seed(0)
    sequences = torch.randint(0, 6, (6, 30))  # a small alphabet, so n-grams repeat
    scores = torch.randn(6, 10)
    for n in (1, 2, 3, 4):
        expected = NoRepeatNGramLogitsProcessor(n)(sequences, scores)
        assert torch.equal(ban_repeated_ngrams(scores, sequences.tolist(), n), expected)


def test_sampling_is_reproducible_and_stays_in_top_k(models):
    model, _ = models
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, top_k=3, temperature=1.5, seed=7, eos_token_id=[])
    first = generate(model, PROMPTS[:2], cfg)
    assert generate(model, PROMPTS[:2], cfg) == first
    for prompt, out in zip(PROMPTS[:2], first):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + out]))[0, len(prompt) - 1 : -1]
        top3 = logits.topk(3).indices
        assert all(token in row for token, row in zip(out, top3.tolist()))
    other_seed = generate(model, PROMPTS[:2], replace(cfg, seed=8))
    assert other_seed != first


def test_streamer_receives_exactly_the_returned_tokens(models):
    model, _ = models
    streamed: list[int] = []
    out = generate(model, [PROMPTS[1]], GenerationConfig(max_new_tokens=12, eos_token_id=[]), streamer=streamed.append)
    assert streamed == out[0] and len(out[0]) == 12
    ignored: list[int] = []
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=4), streamer=ignored.append)
    assert ignored == []  # batches are not streamed


def test_stop_strings_trim_the_output(tiny_gpt2_dir, qa_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qa_tokenizer_dir))
    model = load_model(tiny_gpt2_dir)
    prompt_text = "Q: x q\nA:"  # single bytes: ids below the tiny model's vocabulary of 320
    prompt = tokenizer.encode(prompt_text)
    assert max(prompt) < model.config.vocab_size == 320, prompt
    full = generate(model, [prompt], GenerationConfig(max_new_tokens=30, eos_token_id=[]))[0]
    text = tokenizer.decode(full)
    stop = tokenizer.decode(full[8:10])
    cut = text.find(stop)
    assert cut > 0

    streamed: list[int] = []
    cfg = GenerationConfig(max_new_tokens=30, eos_token_id=[], stop_strings=["@@never@@", stop])
    out = generate(model, [prompt], cfg, tokenizer=tokenizer, streamer=streamed.append)[0]
    assert out == full[: len(out)] and streamed == out
    assert tokenizer.decode(out) == text[: len(tokenizer.decode(out))]
    assert len(tokenizer.decode(out)) <= cut < len(tokenizer.decode(full[: len(out) + 1]))

    assert generate_text(model, tokenizer, [prompt_text], cfg) == [tokenizer.decode(out)]
    beam = generate(model, [prompt], replace(cfg, num_beams=4), tokenizer=tokenizer)
    assert stop not in tokenizer.decode(beam[0])


def test_learned_positions_are_guarded(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    with pytest.raises(QatuneError, match="128 positions"):
        generate(model, [[5] * 100], GenerationConfig(max_new_tokens=64))
    assert len(generate(model, [[5] * 100], GenerationConfig(max_new_tokens=28, eos_token_id=[]))[0]) == 28


def test_bad_requests_are_clear_errors(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    with pytest.raises(QatuneError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0.0)
    with pytest.raises(QatuneError, match="tokenizer"):
        generate(model, [[5]], GenerationConfig(stop_strings=["x"]))
    with pytest.raises(QatuneError, match="vocabulary"):
        generate(model, [[5, 999]])
    with pytest.raises(QatuneError, match="empty"):
        generate(model, [[5], []])
