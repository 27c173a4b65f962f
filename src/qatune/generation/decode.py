"""Generation with the native `Decoder`: greedy, sampling and beam search, all on a `KVCache`.

Prompts of different lengths are LEFT-padded into one batch with an `attention_mask` (the model counts
positions from the mask, so padding changes nothing), prefilled once, then extended one token per step with
the cache. Everything follows Hugging Face `generate` semantics so that results can be checked against it:

- sampling applies temperature -> top-k -> top-p in HF's order and with HF's tie and keep-at-least-one rules;
- beam search is HF v5's `_beam_search` (2 * num_beams candidates per step, only the best num_beams of them
  may finish, length penalty `sum_logprobs / new_tokens ** length_penalty` where new_tokens counts the
  generated tokens including the final EOS but not the prompt, the same early-stop heuristic);
- `no_repeat_ngram_size` bans n-grams seen anywhere in prompt + generated tokens, in every mode.

Differences from HF, on purpose: the result is the NEW tokens only, without EOS and padding; stop strings cut
the output *before* the stop string (HF keeps it); and learned-position models refuse a request that would
run past their position table (`ConfigError`) instead of failing inside the embedding or silently shortening
the answer — the same prompt then gives the same answer whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qatune.errors import ConfigError
from qatune.models.decoder import Decoder, KVCache

Streamer = Callable[[int], None]

# HF's "impossible" score: added to beams that must not be picked. Finite, so that sums stay ordered.
_NEG = -1.0e9


@dataclass
class GenerationConfig:
    """How to decode. Defaults are greedy decoding of up to 64 tokens, as HF's with `do_sample=False`.

    `eos_token_id=None` means the model's own EOS (`model.config.eos_token_id`); pass `[]` to never stop on
    EOS. `pad_token_id` only fills the left padding of a batch (it is masked), default the model's pad, else
    EOS, else 0. `stop_strings` need the tokenizer passed to `generate`. `seed` makes sampling reproducible.
    `early_stopping`: False (HF's default heuristic), True (stop once num_beams hypotheses are finished) or
    "never" (canonical beam search), for beam search only.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | Literal["never"] = False
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            problems.append("beam sampling (do_sample with num_beams > 1) is not supported")
        if self.do_sample and not self.temperature > 0:
            problems.append(f"temperature must be > 0 when sampling, got {self.temperature} (use do_sample=False)")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            problems.append(f"top_p must be in [0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.early_stopping not in (True, False, "never"):
            problems.append(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if any(not s for s in self.stop_strings):
            problems.append("stop_strings must not contain an empty string")
        if problems:
            raise ConfigError("invalid generation config: " + "; ".join(problems))


def generate(
    model: Decoder,
    input_ids: Sequence[Sequence[int]] | Tensor,
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    streamer: Streamer | None = None,
) -> list[list[int]]:
    """The new tokens for each prompt: without the prompt, EOS or padding, cut before a stop string.

    `input_ids`: token lists of any lengths, or a `[batch, seq]` tensor whose rows are taken as unpadded prompts.
    `tokenizer` is needed only for `config.stop_strings`. `streamer` is called with each new token id when
    there is ONE prompt (ignored for batches): exactly the returned tokens, in order. With stop strings, a
    token is held back while its text could still be the start of a stop string; with beam search the best
    hypothesis is only known at the end, so all its tokens come then.
    The model runs in eval mode under `torch.inference_mode()`; its train/eval mode is restored afterwards.
    """
    config = config or GenerationConfig()
    prompts = _as_prompts(input_ids, model.config.vocab_size)
    if config.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need the tokenizer: pass tokenizer= to generate")
    _check_positions(model, prompts, config.max_new_tokens)
    if config.max_new_tokens == 0:
        return [[] for _ in prompts]
    stops = _StopStrings(tokenizer, config.stop_strings) if config.stop_strings else None
    stream = _Stream(streamer, stops) if streamer is not None and len(prompts) == 1 else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if config.num_beams > 1:
                outputs = _beam_search(model, prompts, config, stops)
            else:
                outputs = _greedy_or_sample(model, prompts, config, stops, stream)
    finally:
        model.train(was_training)
    if stream is not None:
        stream.finish(outputs[0])
    return outputs


def generate_text(
    model: Decoder,
    tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    streamer: Streamer | None = None,
) -> list[str]:
    """Decoded continuations of text prompts (special tokens skipped).

    Prompts are encoded without special tokens, exactly as training encodes the prompt part of an example
    (`batching.encode_example`), so the model sees at inference what it saw in training."""
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    outputs = generate(model, ids, config, tokenizer=tokenizer, streamer=streamer)
    return [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]


# --- logits processing (HF semantics) ---------------------------------------------------------------


def top_k_filter(logits: Tensor, top_k: int, min_tokens_to_keep: int = 1) -> Tensor:
    """Set to -inf every logit below the k-th largest (ties with it are kept), as HF's `TopKLogitsWarper`."""
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
    kth_largest = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """Keep the smallest set of most probable tokens whose probability reaches `top_p`, as HF's `TopPLogitsWarper`.

    Like HF, the cut runs from the least probable token up: a token is dropped while the probability mass at
    or below it is <= 1 - top_p, so ties at the boundary are broken by sort order, and at least
    `min_tokens_to_keep` tokens always survive."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def warp_logits(logits: Tensor, config: GenerationConfig) -> Tensor:
    """Sampling's logits processors in HF's order: temperature, then top-k, then top-p."""
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return logits


def ban_repeated_ngrams(scores: Tensor, sequences: Sequence[Sequence[int]], n: int) -> Tensor:
    """Scores with -inf for every token that would repeat an n-gram of its row's sequence.

    A sequence is the whole context (prompt + generated), as HF's `NoRepeatNGramLogitsProcessor` uses it for
    decoder-only models; the prompt is taken unpadded, so padding never forms n-grams."""
    banned = torch.zeros_like(scores, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq) < n:
            continue
        prefix = list(seq[len(seq) - n + 1 :])
        for start in range(len(seq) - n + 1):
            if list(seq[start : start + n - 1]) == prefix:
                banned[row, seq[start + n - 1]] = True
    return scores.masked_fill(banned, float("-inf"))


# --- decoding loops ---------------------------------------------------------------------------------


def _greedy_or_sample(
    model: Decoder,
    prompts: list[list[int]],
    config: GenerationConfig,
    stops: _StopStrings | None,
    stream: _Stream | None,
) -> list[list[int]]:
    """One token per row per step. A row that ends (EOS or stop string) leaves the batch, cache included, so
    a batch of answers of mixed lengths costs what its unfinished rows cost."""
    eos = _eos_ids(config, model)
    ids, mask = _left_pad(prompts, _pad_id(config, model, eos), _device(model))
    cache = KVCache(model.config.n_layer)
    logits = _next_logits(model, ids, mask, cache)
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(config.seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the prompt each batch row belongs to
    for step in range(config.max_new_tokens):
        if config.no_repeat_ngram_size:
            context = [prompts[i] + outputs[i] for i in active]
            logits = ban_repeated_ngrams(logits, context, config.no_repeat_ngram_size)
        if config.do_sample:
            probs = F.softmax(warp_logits(logits, config), dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        going_on = []
        for row, (i, token) in enumerate(zip(active, next_tokens.tolist())):
            if token in eos:
                continue
            outputs[i].append(token)
            if stops is None or not stops.found(outputs[i]):
                going_on.append(row)
        if stream is not None:
            stream.push(outputs[0])
        if not going_on or step + 1 == config.max_new_tokens:
            break
        if len(going_on) < len(active):
            keep = torch.tensor(going_on, device=mask.device)
            cache.reorder(keep)
            mask, next_tokens = mask[keep], next_tokens[keep]
            active = [active[row] for row in going_on]
        mask = torch.cat((mask, mask.new_ones(len(active), 1)), dim=1)
        logits = _next_logits(model, next_tokens[:, None], mask, cache)
    return [stops.trim(out) for out in outputs] if stops is not None else outputs


@dataclass
class _Beams:
    """Beam search state, per prompt: `num_beams` live beams and a pool of the best finished hypotheses."""

    running: Tensor  # [batch, beams, max_new] tokens of the live beams
    running_scores: Tensor  # [batch, beams] summed log-probabilities
    pool: Tensor  # [batch, beams, max_new] finished hypotheses (or placeholders)
    pool_scores: Tensor  # [batch, beams] length-penalised scores
    pool_lengths: Tensor  # [batch, beams] new tokens of each hypothesis
    pool_is_hypothesis: Tensor  # [batch, beams] False for placeholder entries
    improvable: Tensor  # [batch, 1] whether a prompt's pool can still improve

    @classmethod
    def start(cls, batch: int, beams: int, n_max: int, device: torch.device) -> _Beams:
        running = torch.zeros(batch, beams, n_max, dtype=torch.long, device=device)
        running_scores = torch.zeros(batch, beams, device=device)
        running_scores[:, 1:] = _NEG  # all beams start identical: only beam 0's continuations are distinct
        return cls(running, running_scores, torch.zeros_like(running), torch.full((batch, beams), _NEG, device=device),
                   torch.zeros(batch, beams, dtype=torch.long, device=device),
                   torch.zeros(batch, beams, dtype=torch.bool, device=device),
                   torch.ones(batch, 1, dtype=torch.bool, device=device))


def _beam_search(
    model: Decoder,
    prompts: list[list[int]],
    config: GenerationConfig,
    stops: _StopStrings | None,
) -> list[list[int]]:
    """HF v5's beam search (`GenerationMixin._beam_search`), step for step, over the new tokens only.

    Per prompt: `num_beams` live beams and a pool of the `num_beams` best finished hypotheses. Each step takes
    the best 2 * num_beams continuations (more with several EOS ids, so that num_beams unfinished ones always
    remain); those that end (EOS, stop string, or the last allowed token) may enter the pool only if they rank
    among the first num_beams, scored `sum_logprobs / new_tokens ** length_penalty`; the best unfinished ones
    continue. The search stops when no prompt's pool can improve (HF's heuristic), or with early_stopping=True
    when every pool is full."""
    eos = _eos_ids(config, model)
    beams, n_max = config.num_beams, config.max_new_tokens
    batch, device = len(prompts), _device(model)
    ids, mask = _left_pad(prompts, _pad_id(config, model, eos), device)
    cache = KVCache(model.config.n_layer)
    logits = _next_logits(model, ids, mask, cache)
    # Prefill each prompt once, then give every beam its own copy of the cache.
    to_beams = torch.arange(batch, device=device).repeat_interleave(beams)
    cache.reorder(to_beams)
    logits, mask = logits[to_beams], mask[to_beams]
    state = _Beams.start(batch, beams, n_max, device)
    for step in range(n_max):
        candidates, cand_scores, parents, tokens, ends = _beam_candidates(state, logits, prompts, step, config, eos,
                                                                          stops)
        beam_parents = _beam_continue(state, candidates, cand_scores, parents, ends)
        _beam_pool(state, candidates, cand_scores, tokens, ends, step + 1, config)
        pools_full = bool(state.pool_is_hypothesis.all()) and config.early_stopping is True
        if not bool(state.improvable.any()) or pools_full or bool(ends.all()):
            break
        cache.reorder((beam_parents + torch.arange(batch, device=device)[:, None] * beams).flatten())
        mask = torch.cat((mask, mask.new_ones(batch * beams, 1)), dim=1)
        logits = _next_logits(model, state.running[:, :, step].reshape(-1, 1), mask, cache)
    outputs = []
    for b in range(batch):
        best_tokens = state.pool[b, 0, : state.pool_lengths[b, 0]].tolist()
        if best_tokens and best_tokens[-1] in eos:
            best_tokens.pop()
        outputs.append(stops.trim(best_tokens) if stops is not None else best_tokens)
    return outputs


def _beam_candidates(state: _Beams, logits: Tensor, prompts: list[list[int]], step: int, config: GenerationConfig,
                     eos: list[int], stops: _StopStrings | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The best `max(2, 1 + len(eos)) * num_beams` continuations of every prompt's beams: their tokens so far,
    summed log-probabilities, parent beams, new tokens, and whether each ends here."""
    batch, beams, n_max = state.running.shape
    n_new = step + 1  # tokens per candidate after this step
    log_probs = F.log_softmax(logits, dim=-1)
    if config.no_repeat_ngram_size:
        context = [prompts[b] + state.running[b, k, :step].tolist() for b in range(batch) for k in range(beams)]
        log_probs = ban_repeated_ngrams(log_probs, context, config.no_repeat_ngram_size)
    vocab = log_probs.shape[-1]
    totals = (log_probs.view(batch, beams, vocab) + state.running_scores[:, :, None]).view(batch, beams * vocab)
    cand_scores, flat = torch.topk(totals, max(2, 1 + len(eos)) * beams)
    parents, tokens = flat // vocab, flat % vocab
    candidates = _gather(state.running, parents)
    candidates[:, :, step] = tokens
    ends = torch.isin(tokens, torch.tensor(eos, dtype=torch.long, device=tokens.device)) | (n_new == n_max)
    if stops is not None:
        ends |= torch.tensor([[stops.found(c[:n_new].tolist()) for c in row] for row in candidates],
                             device=tokens.device)
    return candidates, cand_scores, parents, tokens, ends


def _beam_continue(state: _Beams, candidates: Tensor, cand_scores: Tensor, parents: Tensor, ends: Tensor) -> Tensor:
    """The best candidates that did not end become the live beams; returns each new beam's parent beam."""
    live_scores = cand_scores + ends.float() * _NEG
    keep = torch.topk(live_scores, state.running.shape[1]).indices
    state.running, state.running_scores = _gather(candidates, keep), _gather(live_scores, keep)
    return _gather(parents, keep)


def _beam_pool(state: _Beams, candidates: Tensor, cand_scores: Tensor, tokens: Tensor, ends: Tensor, n_new: int,
               config: GenerationConfig) -> None:
    """Candidates that ended (among the first num_beams) enter the pool if they beat its worst member."""
    beams = state.running.shape[1]
    finishing = ends & (torch.arange(ends.shape[1], device=ends.device) < beams)
    scores = cand_scores / (n_new**config.length_penalty)
    scores += (state.pool_is_hypothesis.all(-1, keepdim=True) & (config.early_stopping is True)).float() * _NEG
    scores += (~state.improvable).float() * _NEG
    scores += (~finishing).float() * _NEG
    merged_scores = torch.cat((state.pool_scores, scores), dim=1)
    best = torch.topk(merged_scores, beams).indices
    state.pool = _gather(torch.cat((state.pool, candidates), dim=1), best)
    state.pool_scores = _gather(merged_scores, best)
    state.pool_lengths = _gather(torch.cat((state.pool_lengths, torch.full_like(tokens, n_new)), dim=1), best)
    state.pool_is_hypothesis = _gather(torch.cat((state.pool_is_hypothesis, finishing), dim=1), best)
    state.improvable &= _can_improve(state.running_scores, state.pool_scores, state.pool_is_hypothesis, n_new, config)


def _can_improve(
    running_scores: Tensor, pool_scores: Tensor, pool_is_hypothesis: Tensor, n_new: int, config: GenerationConfig
) -> Tensor:
    """HF's `_check_early_stop_heuristic`: `[batch, 1]`, whether the best live beam could still beat the worst
    finished hypothesis (always True while a pool has free places). The best live beam's score is judged at
    its current length, or at the maximum length with early_stopping="never" and a positive length penalty."""
    length = config.max_new_tokens if config.early_stopping == "never" and config.length_penalty > 0 else n_new
    best_running = running_scores[:, :1] / (length**config.length_penalty)
    worst_pooled = torch.where(pool_is_hypothesis, pool_scores.min(dim=1, keepdim=True).values, _NEG)
    return (best_running > worst_pooled).any(dim=-1, keepdim=True)


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """`tensor[b, index[b, j], ...]` for `[batch, beams, ...]` tensors (HF's `_gather_beams`)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


# --- helpers ----------------------------------------------------------------------------------------


def _next_logits(model: Decoder, ids: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
    """Float32 logits of the last position only: the LM head never runs over the whole prompt."""
    hidden = model.hidden_states(ids, attention_mask=mask, kv_cache=cache)
    return model.lm_head(hidden[:, -1]).float()


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _as_prompts(input_ids: Sequence[Sequence[int]] | Tensor, vocab_size: int) -> list[list[int]]:
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        prompts = input_ids.tolist()
    else:
        prompts = [list(map(int, p)) for p in input_ids]
    if not prompts:
        raise ConfigError("generate needs at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty: the model needs at least one token to continue")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} has token ids outside the model's vocabulary of {vocab_size}: {bad[:5]}")
    return prompts


def _check_positions(model: Decoder, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Learned position tables end at `max_positions`; RoPE models have no hard limit and are not checked."""
    cfg = model.config
    longest = max(len(p) for p in prompts)
    if cfg.positions == "learned" and longest + max_new_tokens > cfg.max_positions:
        raise ConfigError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"{cfg.max_positions} positions: shorten the prompt or lower max_new_tokens "
            f"(room for {max(cfg.max_positions - longest, 0)} new tokens here)"
        )


def _eos_ids(config: GenerationConfig, model: Decoder) -> list[int]:
    eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_id(config: GenerationConfig, model: Decoder, eos: list[int]) -> int:
    for candidate in (config.pad_token_id, model.config.pad_token_id, eos[0] if eos else None):
        if candidate is not None and 0 <= candidate < model.config.vocab_size:
            return candidate
    return 0


def _device(model: Decoder) -> torch.device:
    return next(model.parameters()).device


class _StopStrings:
    """Stop strings, looked for in the decoded text of the generated tokens (never in the prompt)."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.strings = list(strings)

    def _text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.strings) if i != -1]
        return min(found) if found else None

    def found(self, tokens: Sequence[int]) -> bool:
        return self._first_stop(self._text(tokens)) is not None

    def trim(self, tokens: list[int]) -> list[int]:
        """The longest prefix of `tokens` whose text ends before the first stop string."""
        cut = self._first_stop(self._text(tokens))
        return tokens if cut is None else tokens[: self._prefix_within(tokens, cut)]

    def settled(self, tokens: list[int]) -> int:
        """How many leading tokens no stop string can claim any more, whatever comes next: their text ends
        before the first stop string and before any tail of the text that could start one."""
        text = self._text(tokens)
        cut = self._first_stop(text)
        cut = len(text) if cut is None else cut
        for s in self.strings:
            for start in range(max(0, len(text) - len(s) + 1), cut):
                if s.startswith(text[start:]):
                    cut = start
                    break
        return self._prefix_within(tokens, cut)

    def _prefix_within(self, tokens: list[int], n_chars: int) -> int:
        k = len(tokens)
        while k > 0 and len(self._text(tokens[:k])) > n_chars:
            k -= 1
        return k


class _Stream:
    """Passes settled tokens to the user's streamer, so that it only ever sees tokens that will be returned."""

    def __init__(self, streamer: Streamer, stops: _StopStrings | None):
        self.streamer = streamer
        self.stops = stops
        self.sent = 0

    def push(self, tokens: list[int]) -> None:
        settled = len(tokens) if self.stops is None else self.stops.settled(tokens)
        self._send(tokens[:settled])

    def finish(self, tokens: list[int]) -> None:
        self._send(tokens)

    def _send(self, tokens: list[int]) -> None:
        for token in tokens[self.sent :]:
            self.streamer(token)
        self.sent = max(self.sent, len(tokens))
