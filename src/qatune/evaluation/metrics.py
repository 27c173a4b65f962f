"""Evaluation metrics: SQuAD EM/F1 for extractive-style QA, and the E2E NLG metric suite for generation.

Scales: `exact_match`, `token_f1`, `contains_answer` and `per_example_qa` are in [0, 1] (one example);
`qa_scores`, `bleu`, `rouge_l` and `meteor` are percentages (0-100); `answer_length` counts words; `nist`
and `cider` keep their native scales (NIST about 0-15, CIDEr-D 0-10), as the E2E challenge reports them.

QA follows the official SQuAD v2.0 evaluation script: its answer normalisation, max over the gold
answers, gold answers that normalise to "" are dropped, and a question with no gold answer is scored
against "" (so an empty prediction is right for an unanswerable question). Beside EM and F1, `contains`
(does the answer appear in the prediction, `contains_answer`) and the prediction's length in words
(`answer_length`): EM judges a model that answers in sentences as wrong, `contains` judges it by whether
it said the answer at all, and the length tells which of the two a model's answers need.

Generation numbers are close to, but not the same as, the official E2E script's: that script runs
mteval-v13a (Perl) for BLEU and NIST and the MS-COCO caption code (Java PTB tokenizer, Java METEOR 1.5)
for METEOR, ROUGE-L and CIDEr. Here BLEU is sacrebleu (13a tokenizer, case-sensitive), ROUGE-L is
rouge_score (its own lowercasing alphanumeric tokenizer, no stemming), NIST is nltk's port, METEOR is
nltk's sentence METEOR averaged, and CIDEr-D reimplements the coco-caption scorer. NIST, METEOR and
CIDEr-D all see `tokenize`'s tokens.

sacrebleu, rouge_score and nltk are imported inside the functions, so importing this module is cheap
and a missing package fails only the metric that needs it, naming the pip package to install.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from qatune.errors import DataError, QatuneError

logger = logging.getLogger(__name__)


class MissingDependencyError(QatuneError):
    """A metric's optional package is not installed; the message names the pip package."""


def _require(module: str, pip_package: str) -> ModuleType:
    """Import `module` now, or fail with the pip command that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"this metric needs `{module}`: pip install {pip_package}") from err


# --------------------------------------------------------------------------------------------------
# Question answering (SQuAD)

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, drop a/an/the, collapse whitespace.

    The order matters and is the official script's: punctuation goes before articles, so "the-cat"
    becomes "thecat" and keeps its "the".
    """
    no_punctuation = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", no_punctuation).split())


def _gold_answers(references: Sequence[str]) -> list[str]:
    """The gold answers SQuAD v2 scores against: non-empty after normalisation, else [""] (unanswerable)."""
    if isinstance(references, str):
        raise DataError("references must be a list of answer strings, not one string")
    gold = [ref for ref in references if normalize_answer(ref)]
    return gold or [""]


def _f1_one(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 between two normalised answers; two empty answers agree (F1 = 1)."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(ref) for ref in _gold_answers(references)))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best token-overlap F1 against any gold answer, in [0, 1]."""
    return max(_f1_one(prediction, ref) for ref in _gold_answers(references))


def _contains_one(prediction_tokens: list[str], reference_tokens: list[str]) -> bool:
    """Whether the reference's tokens occur as one contiguous run in the prediction's tokens; the empty
    reference (an unanswerable question) only in the empty prediction, as EM has it."""
    if not reference_tokens:
        return not prediction_tokens
    width = len(reference_tokens)
    return any(prediction_tokens[i : i + width] == reference_tokens
               for i in range(len(prediction_tokens) - width + 1))


def contains_answer(prediction: str, references: Sequence[str]) -> float:
    """1.0 if a gold answer appears as whole words in the prediction (both SQuAD-normalised), else 0.0.

    The normalised gold answer must be a contiguous run of the normalised prediction's words, so "I think it
    is Paris, France." contains "Paris" but "Parisian" does not (nor does "Paris-based": normalisation drops
    the hyphen and leaves one word). Max over the aliases, as EM. An unanswerable question (no gold answer)
    is scored as EM scores it: only an empty prediction contains "nothing"; otherwise the empty answer
    would be inside every prediction.

    It credits a right answer inside a sentence, which EM calls wrong, and equally a hedge that lists
    several guesses ("Paris or Lyon"): it measures whether the model *said* the answer, so it bounds what
    the model knows from above, as EM bounds it from below. Read it with `answer_length`.
    """
    prediction_tokens = normalize_answer(prediction).split()
    return float(any(_contains_one(prediction_tokens, normalize_answer(ref).split())
                     for ref in _gold_answers(references)))


def answer_length(prediction: str) -> int:
    """The prediction's length in words (whitespace-separated, before normalisation)."""
    return len(prediction.split())


def per_example_qa(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """EM, F1 and contains of one prediction, in [0, 1], and its length in words, for a predictions.jsonl row."""
    return {"em": exact_match(prediction, references), "f1": token_f1(prediction, references),
            "contains": contains_answer(prediction, references), "answer_length": answer_length(prediction)}


def qa_scores(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Mean EM, F1 and contains over a dataset, in percent, the mean answer length in words, and the count."""
    _check_aligned(predictions, references_list)
    rows = [per_example_qa(pred, refs) for pred, refs in zip(predictions, references_list)]
    n = len(rows)
    return {
        "em": 100.0 * sum(row["em"] for row in rows) / n,
        "f1": 100.0 * sum(row["f1"] for row in rows) / n,
        "contains": 100.0 * sum(row["contains"] for row in rows) / n,
        "answer_length": sum(row["answer_length"] for row in rows) / n,
        "n": n,
    }


# --------------------------------------------------------------------------------------------------
# Text generation (E2E NLG)

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased words, with each punctuation character split off as its own token.

    Used by NIST, METEOR and CIDEr so that "mat." matches "mat"; it is simpler than the PTB tokenizer
    the E2E script uses ("don't" -> "don", "'", "t" rather than "do", "n't").
    """
    return _TOKEN.findall(text.lower())


def _check_aligned(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> None:
    """Refuse misaligned or empty inputs, and a bare string where a list of references belongs."""
    if len(predictions) != len(references_list):
        raise DataError(f"{len(predictions)} predictions but {len(references_list)} reference lists")
    if not predictions:
        raise DataError("no predictions to score")
    if any(isinstance(refs, str) for refs in references_list):
        raise DataError("each references_list item must be a list of reference strings, not a string")


def _check_generation(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> None:
    """Generation metrics also need at least one reference per example."""
    _check_aligned(predictions, references_list)
    if any(len(refs) == 0 for refs in references_list):
        raise DataError("every example needs at least one reference")


def _reference_streams(references_list: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Transpose per-example references into sacrebleu's equal-length reference streams.

    Examples with fewer references are padded with None, which sacrebleu drops (metrics/base.py,
    `_cache_references`). Padding with "" would be wrong: "" counts as a zero-length reference and
    can be picked as the closest reference length, removing the brevity penalty.
    """
    width = max(len(refs) for refs in references_list)
    return [[refs[k] if k < len(refs) else None for refs in references_list] for k in range(width)]


def bleu(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, case-sensitive, exp smoothing), 0-100."""
    _check_generation(predictions, references_list)
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references_list)).score)


def rouge_l(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F-measure, best reference per example, averaged over examples, 0-100."""
    _check_generation(predictions, references_list)
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
        for pred, refs in zip(predictions, references_list)
    ]
    return 100.0 * sum(scores) / len(scores)


def nist(predictions: Sequence[str], references_list: Sequence[Sequence[str]], max_order: int = 5) -> float:
    """Corpus NIST (nltk's implementation) on `tokenize`'s tokens.

    nltk divides by zero when no hypothesis reaches `max_order` tokens; such orders have no n-grams to
    score and add nothing to the NIST sum, so capping the order at the longest hypothesis gives the
    same value without the crash. With no hypothesis or no reference tokens nothing can match: 0.
    """
    _check_generation(predictions, references_list)
    nist_score = _require("nltk.translate.nist_score", "nltk")
    hypotheses = [tokenize(pred) for pred in predictions]
    references = [[tokenize(ref) for ref in refs] for refs in references_list]
    longest = max(len(hyp) for hyp in hypotheses)
    if longest == 0 or not any(ref for refs in references for ref in refs):
        return 0.0
    return float(nist_score.corpus_nist(references, hypotheses, n=min(max_order, longest)))


def _wordnet() -> Any | None:
    """nltk's WordNet reader if its corpus data is installed, else None (METEOR's synonym stage needs it)."""
    corpus = _require("nltk.corpus", "nltk")
    try:
        corpus.wordnet.ensure_loaded()
    except LookupError:
        return None
    return corpus.wordnet


def meteor(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float | None:
    """Mean nltk sentence METEOR (best reference per example), 0-100; None without WordNet data.

    nltk's METEOR cannot run without the WordNet corpus, which `nltk.download("wordnet")` installs and
    pip does not; returning None (with a warning) keeps the other metrics usable where it is missing.
    """
    _check_generation(predictions, references_list)
    wordnet = _wordnet()
    if wordnet is None:
        logger.warning("METEOR skipped: nltk's WordNet corpus is not installed (python -m nltk.downloader wordnet)")
        return None
    meteor_score = _require("nltk.translate.meteor_score", "nltk")
    scores = [
        meteor_score.meteor_score([tokenize(ref) for ref in refs], tokenize(pred), wordnet=wordnet)
        for pred, refs in zip(predictions, references_list)
    ]
    return 100.0 * sum(scores) / len(scores)


# CIDEr-D (Vedantam et al. 2015, as implemented in coco-caption's cider_scorer.py, which the E2E
# challenge ran): per n-gram order, cosine similarity of TF-IDF vectors with the candidate's weights
# clipped at the reference's, times a Gaussian length penalty; averaged over orders and references, x10.
# IDF comes from the references of this corpus, so a one-example corpus always scores 0.


@dataclass
class _TfIdf:
    """One sentence as per-order TF-IDF weights, their L2 norms, and its length in tokens."""

    weights: list[dict[tuple[str, ...], float]]
    norms: list[float]
    length: int


def _ngram_counts(tokens: list[str], max_order: int) -> Counter[tuple[str, ...]]:
    """Counts of every n-gram of order 1..max_order."""
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1)
    )


def _tfidf(
    tokens: list[str], max_order: int, doc_freq: Counter[tuple[str, ...]], log_n_docs: float
) -> _TfIdf:
    """TF-IDF vector of a sentence; an n-gram in no reference set gets df = 1, as in coco-caption."""
    weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_order)]
    for gram, count in _ngram_counts(tokens, max_order).items():
        weights[len(gram) - 1][gram] = count * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
    return _TfIdf(weights, norms, len(tokens))


def _cider_d_similarity(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> float:
    """Mean over n-gram orders of the clipped cosine similarity, times the Gaussian length penalty."""
    penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * sigma**2))
    total = 0.0
    for hyp_w, ref_w, hyp_norm, ref_norm in zip(hyp.weights, ref.weights, hyp.norms, ref.norms):
        if hyp_norm == 0 or ref_norm == 0:
            continue
        dot = sum(min(w, ref_w.get(gram, 0.0)) * ref_w.get(gram, 0.0) for gram, w in hyp_w.items())
        total += dot / (hyp_norm * ref_norm)
    return penalty * total / len(hyp.weights)


def cider(
    predictions: Sequence[str],
    references_list: Sequence[Sequence[str]],
    max_order: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D (mean of per-example scores, 0-10 scale) on `tokenize`'s tokens."""
    _check_generation(predictions, references_list)
    hypotheses = [tokenize(pred) for pred in predictions]
    references = [[tokenize(ref) for ref in refs] for refs in references_list]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in references:
        doc_freq.update(set().union(*(_ngram_counts(ref, max_order) for ref in refs)))
    log_n_docs = math.log(len(references))

    scores = []
    for hyp_tokens, refs in zip(hypotheses, references):
        hyp = _tfidf(hyp_tokens, max_order, doc_freq, log_n_docs)
        sims = [_cider_d_similarity(hyp, _tfidf(ref, max_order, doc_freq, log_n_docs), sigma) for ref in refs]
        scores.append(10.0 * sum(sims) / len(sims))
    return sum(scores) / len(scores)


_GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float | None]] = {
    "bleu": bleu,
    "rouge_l": rouge_l,
    "nist": nist,
    "meteor": meteor,
    "cider": cider,
}


def generation_scores(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Every E2E metric that can run here; one whose package or data is missing is None, with a warning."""
    _check_generation(predictions, references_list)
    scores: dict[str, Any] = {}
    for name, metric in _GENERATION_METRICS.items():
        try:
            scores[name] = metric(predictions, references_list)
        except MissingDependencyError as err:
            logger.warning(f"{name} skipped: {err}")
            scores[name] = None
    scores["n"] = len(predictions)
    return scores
