"""Shared fixtures: tiny random checkpoints saved the way Hugging Face saves them, a small GPT-2-style tokenizer
built here, and the real GPT-2 tokenizer.

The checkpoints use a large init std (0.5 instead of 0.02): the logits then spread over several units, so a
comparison with transformers is decided by the model and never by float noise between two near-equal tokens,
and greedy decoding wanders over many tokens instead of repeating one.

Only tests about the real GPT-2 tokenizer or the real data files use ../shared (and skip where it is absent);
everything else runs on a fresh clone with the tokenizer of `qa_tokenizer_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GPT2_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers" / "gpt2"
ENDOFTEXT = "<|endoftext|>"
QA_TOKENIZER_VOCAB = 1024
# A little generic English beside the QA facts, so that common words and punctuation get merges of their own;
# the yes/no questions make " yes" one token, as in GPT-2 (test_evaluate trains a model to answer "yes").
_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A small language model reads a question and writes an answer.
It was the best of times, it was the worst of times; we were all going direct to Heaven, we were all going the
other way. Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,
I thought I would sail about a little and see the watery part of the world. Yes, no, maybe: one, two, three,
four, five, six, seven, eight, nine, ten. Hello, world! Who, what, where, when, why and how? "Quoted" text,
(brackets), numbers like 3.14, 42 and 1999, and an e-mail: someone@example.com.
Is the sky blue? yes. Is fire cold? no. Is water wet? yes. Can a fish fly? no. Do birds sing? yes, they do.
Is snow white? yes. Is the sun a star? yes. Is ice hot? no. Is this a test? yes, it is. Are you sure? yes.
"""


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A random GPT-2 (2 layers, width 64, vocab 320, 128 positions, bos 1, eos 2) saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128,
                     bos_token_id=1, eos_token_id=2, initializer_range=0.5)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random Llama with grouped-query attention (4 query heads, 2 kv heads), untied head, vocab 320."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.5)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """The real GPT-2 tokenizer in ../shared (read-only, outside the repository): skip where it is absent."""
    if not (GPT2_TOKENIZER_DIR / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_TOKENIZER_DIR}")
    return GPT2_TOKENIZER_DIR.resolve()


def _tokenizer_corpus() -> list[str]:
    """The shipped QA facts, rendered as qatune's default template renders them, plus `_ENGLISH`."""
    from qatune.data.readers import SAMPLE_DATA

    texts = []
    for name in ("facts_train.jsonl", "facts_test.jsonl"):
        for line in (SAMPLE_DATA / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
            texts.extend(row.get("aliases", []))
    return [*texts, *_ENGLISH.splitlines()]


@pytest.fixture(scope="session")
def qa_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer built from the shipped QA facts, shaped like GPT-2's: GPT-2's
    pre-tokenizer, no prefix space, vocabulary `QA_TOKENIZER_VOCAB` (id 0 `<|endoftext|>` = bos = eos = unk,
    ids 1-256 the bytes, then merges), no pad token (qatune.load_tokenizer pads with EOS, as for GPT-2).
    Every string encodes (byte-level: nothing is unknown) and decodes back to itself. Needs nothing outside
    the repository, so the tests built on it run on a fresh clone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=QA_TOKENIZER_VOCAB, min_frequency=1, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                  unk_token=ENDOFTEXT, model_max_length=128)
    assert len(tokenizer) == QA_TOKENIZER_VOCAB and tokenizer.eos_token_id == 0
    path = tmp_path_factory.mktemp("qa-tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qa_gpt2_dir(tmp_path_factory, qa_tokenizer_dir) -> Path:
    """A small random GPT-2 (width 32, 2 layers, 128 positions) with the tokenizer of `qa_tokenizer_dir` beside
    it (vocabulary, bos and eos taken from it), for training, evaluation and sweep tests. Dropout is 0 so that
    runs differing only in how the work is split (DDP, backends) see identical computations; tests that need
    dropout set it on a copy."""
    import shutil

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(qa_tokenizer_dir)
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    path = tmp_path_factory.mktemp("qa-gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tokenizer), bos_token_id=eos,
                     eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    for f in qa_tokenizer_dir.iterdir():
        shutil.copy(f, path)
    return path


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (timing-free comparisons that must not depend on thread scheduling)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
