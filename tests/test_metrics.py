"""Metrics against hand-computed values and independent references (official SQuAD v2 formulas,
sacrebleu and nltk called directly, CIDEr-D values from pycocoevalcap)."""

from __future__ import annotations

import collections
import logging
import math
import re
import string
import sys
import warnings

import pytest

from qatune.errors import QatuneError
from qatune.evaluation import metrics

# --------------------------------------------------------------------------------------------------
# Independent reference: the formulas of the official SQuAD v2.0 evaluation script
# (evaluate-v2.0.py: normalize_answer, get_tokens, compute_exact, compute_f1, and the gold-answer
# filtering in get_raw_scores), written out literally here so the package is checked against them.


def official_normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_get_tokens(s):
    if not s:
        return []
    return official_normalize_answer(s).split()


def official_compute_exact(a_gold, a_pred):
    return int(official_normalize_answer(a_gold) == official_normalize_answer(a_pred))


def official_compute_f1(a_gold, a_pred):
    gold_toks = official_get_tokens(a_gold)
    pred_toks = official_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def official_scores(a_pred, answers):
    gold_answers = [a for a in answers if official_normalize_answer(a)]
    if not gold_answers:
        gold_answers = [""]
    return (
        max(official_compute_exact(a, a_pred) for a in gold_answers),
        max(official_compute_f1(a, a_pred) for a in gold_answers),
    )


QA_CASES = [
    ("The  Cat!", ["cat"]),
    ("the cat sat", ["a cat sat down"]),
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos", "Broncos"]),
    ("in 1990", ["1990", "the year 1990"]),
    ("the-cat", ["cat"]),
    ("An apple, a pear", ["apple pear", "pears"]),
    ("", []),
    ("Paris", []),
    ("", ["the", "Paris"]),
    ("the", ["a"]),
    ("Café   Olé.", ["café olé"]),
    ("one two two", ["two one one", "three"]),
    ("x", ["y"]),
]


def test_normalize_answer_by_hand():
    assert metrics.normalize_answer("The  Cat!") == "cat"
    assert metrics.normalize_answer("an Apple, a pear.") == "apple pear"
    # punctuation is removed before articles, so the article survives inside a hyphenated word
    assert metrics.normalize_answer("the-cat") == "thecat"


def test_token_f1_by_hand():
    # prediction tokens {cat, sat}, gold {cat, sat, down}: P = 2/2, R = 2/3
    precision, recall = 1.0, 2 / 3
    assert metrics.token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(
        2 * precision * recall / (precision + recall)
    )
    assert metrics.token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)


@pytest.mark.parametrize(("prediction", "answers"), QA_CASES)
def test_em_f1_match_official_squad_v2(prediction, answers):
    em, f1 = official_scores(prediction, answers)
    assert metrics.exact_match(prediction, answers) == em
    assert metrics.token_f1(prediction, answers) == pytest.approx(f1)
    row = metrics.per_example_qa(prediction, answers)
    assert {k: row[k] for k in ("em", "f1")} == pytest.approx({"em": em, "f1": f1})


def test_unanswerable_and_empty_gold_conventions():
    assert metrics.per_example_qa("", []) == {"em": 1.0, "f1": 1.0, "contains": 1.0, "answer_length": 0}
    assert metrics.per_example_qa("Paris", []) == {"em": 0.0, "f1": 0.0, "contains": 0.0, "answer_length": 1}
    # a gold answer that normalises to "" is dropped, so "" no longer matches it
    assert metrics.per_example_qa("", ["the", "Paris"]) == {"em": 0.0, "f1": 0.0, "contains": 0.0,
                                                            "answer_length": 0}


def test_qa_scores_in_percent():
    scores = metrics.qa_scores(["cat", "the cat sat"], [["The cat"], ["a cat sat down"]])
    # contains: "cat" in "cat" yes; "cat sat down" in "cat sat" no. Lengths 1 and 3 words.
    assert scores == pytest.approx({"em": 50.0, "f1": 90.0, "contains": 50.0, "answer_length": 2.0, "n": 2})


# `contains`, independently: the official normalisation, then a regular expression that finds the gold
# text between whitespace (or the ends) of the normalised prediction; an unanswerable question (no gold
# answer survives normalisation) is contained only in an empty prediction, as its EM is scored.


def reference_contains(prediction, answers):
    pred = official_normalize_answer(prediction)
    golds = [official_normalize_answer(a) for a in answers if official_normalize_answer(a)]
    if not golds:
        return float(pred == "")
    return float(any(re.search(r"(?<!\S)" + re.escape(g) + r"(?!\S)", pred) for g in golds))


CONTAINS_CASES = [
    # (prediction, gold answers, contains by hand)
    ("I think it is Paris, France.", ["Paris"], 1.0),  # an answer inside a sentence
    ("Paris or Lyon", ["Lyon"], 1.0),  # a hedge with two guesses is credited too
    ("Paris or Lyon", ["Marseille"], 0.0),
    ("Parisian", ["Paris"], 0.0),  # a word that merely starts with the answer is not the answer
    ("The capital is Parisian.", ["Paris"], 0.0),
    ("Paris-based", ["Paris"], 0.0),  # normalisation drops the hyphen: one word, "parisbased"
    ("It is the United States.", ["United States of America", "the United States", "USA"], 1.0),
    ("the United States", ["united states of america"], 0.0),  # a multi-word answer must appear whole
    ("the United States of America!", ["united states of america"], 1.0),
    ("The U.S.A., of course", ["USA"], 1.0),  # punctuation goes before matching: "usa of course"
    ("a cat", ["The Cat."], 1.0),  # articles and punctuation go on both sides
    ("It happened in 1990.", ["1990"], 1.0),
    ("It happened in 19901.", ["1990"], 0.0),  # a number inside a longer number is not that number
    ("about 1,000 people", ["1000"], 1.0),
    ("pi is 3.14", ["3"], 0.0),  # "3.14" normalises to "314"
    ("", []),
    ("", ["the"]),  # gold normalising to "" is dropped: unanswerable
    ("Paris", []),
    ("", ["Paris"], 0.0),
    ("Café Olé!", ["café olé"], 1.0),
]


@pytest.mark.parametrize("case", CONTAINS_CASES, ids=[f"{c[0]!r}-{c[1]!r}" for c in CONTAINS_CASES])
def test_contains_against_an_independent_computation(case):
    prediction, answers = case[0], case[1]
    expected = reference_contains(prediction, answers)
    if len(case) == 3:
        assert expected == case[2], "the reference computation disagrees with the hand value"
    assert metrics.contains_answer(prediction, answers) == expected
    assert metrics.per_example_qa(prediction, answers)["contains"] == expected


@pytest.mark.parametrize(("prediction", "answers"), QA_CASES)
def test_contains_on_the_squad_cases(prediction, answers):
    assert metrics.contains_answer(prediction, answers) == reference_contains(prediction, answers)
    # contains is at least EM: an exact answer is contained in itself
    assert metrics.contains_answer(prediction, answers) >= metrics.exact_match(prediction, answers)


def test_unanswerable_contains_is_its_em():
    for prediction in ("", "   ", "Paris", "the", "."):
        assert metrics.contains_answer(prediction, []) == metrics.exact_match(prediction, []), prediction
    assert metrics.contains_answer("", []) == 1.0 and metrics.contains_answer("Paris", []) == 0.0


def test_answer_length_counts_words_of_the_raw_prediction():
    for prediction, words in (("", 0), ("Paris", 1), ("I think it is Paris, France.", 6), ("  a\tb\nc  ", 3),
                              ("The U.S.A., of course", 4)):
        assert metrics.answer_length(prediction) == words == len(re.findall(r"\S+", prediction))


def test_qa_scores_aggregate_contains_and_length():
    predictions = ["I think it is Paris, France.", "Parisian", "Rome or Lyon", "", "1990"]
    references = [["Paris"], ["Paris"], ["Lyon", "Lyons"], [], ["the year 1990"]]
    scores = metrics.qa_scores(predictions, references)
    assert scores["contains"] == pytest.approx(100 * (1 + 0 + 1 + 1 + 0) / 5)
    assert scores["answer_length"] == pytest.approx((6 + 1 + 3 + 0 + 1) / 5)
    assert scores["em"] == pytest.approx(100 * 1 / 5)  # only the empty answer to the unanswerable question


def test_bad_inputs_are_refused():
    with pytest.raises(QatuneError):
        metrics.qa_scores(["a"], [["a"], ["b"]])
    with pytest.raises(QatuneError):
        metrics.qa_scores([], [])
    with pytest.raises(QatuneError, match="not one string"):
        metrics.exact_match("cat", "cat")
    with pytest.raises(QatuneError, match="at least one reference"):
        metrics.bleu(["a cat"], [[]])


# --------------------------------------------------------------------------------------------------
# Generation metrics


def test_tokenize_splits_punctuation_and_lowercases():
    assert metrics.tokenize("The mat. Price: £20-25!") == [
        "the",
        "mat",
        ".",
        "price",
        ":",
        "£",
        "20",
        "-",
        "25",
        "!",
    ]


def test_bleu_identical_is_100():
    assert metrics.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)


def test_bleu_single_sentence_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected)


def test_bleu_variable_reference_counts():
    import sacrebleu

    predictions = ["the cat", "a dog barked at the postman today", "it is raining"]
    references = [
        ["the cat sat on the mat"],
        ["the dog barked at the postman", "a dog was barking at the mailman today", "dogs bark"],
        ["it rains", "it is raining heavily"],
    ]
    streams = [
        ["the cat sat on the mat", "the dog barked at the postman", "it rains"],
        [None, "a dog was barking at the mailman today", "it is raining heavily"],
        [None, "dogs bark", None],
    ]
    direct = sacrebleu.corpus_bleu(predictions, streams).score
    assert metrics.bleu(predictions, references) == pytest.approx(direct)
    # a repeated reference changes neither clipped counts nor the closest length: same score as padding
    repeated = [refs + [refs[0]] * (3 - len(refs)) for refs in references]
    assert sacrebleu.corpus_bleu(predictions, list(map(list, zip(*repeated)))).score == pytest.approx(direct)
    # padding with "" instead would add a zero-length reference and drop the brevity penalty of "the cat"
    empty_padded = [[ref if ref is not None else "" for ref in stream] for stream in streams]
    assert sacrebleu.corpus_bleu(predictions, empty_padded).score != pytest.approx(direct)


def test_rouge_l_by_hand():
    # LCS("police killed the gunman", "the gunman was killed by police") = "the gunman": P = 2/4, R = 2/6
    assert metrics.rouge_l(
        ["police killed the gunman"], [["the gunman was killed by police"]]
    ) == pytest.approx(40.0)
    # best reference per example: LCS 3 of 4 tokens each way (F = 0.75); then a perfect match; mean 87.5
    score = metrics.rouge_l(
        ["police killed the gunman", "a perfect match"],
        [["the gunman was killed by police", "police kill the gunman"], ["a perfect match"]],
    )
    assert score == pytest.approx(87.5)


def test_nist_matches_nltk_and_is_monotonic():
    from nltk.translate.nist_score import corpus_nist

    refs = [["The Eagle is a cheap coffee shop near Burger King.", "The Eagle coffee shop is cheap."]]
    identical = metrics.nist(["The Eagle is a cheap coffee shop near Burger King."], refs)
    one_changed = metrics.nist(["The Eagle is a pricey coffee shop near Burger King."], refs)
    unrelated = metrics.nist(["Zizzi serves Italian food."], refs)
    assert identical > one_changed > unrelated >= 0.0
    assert identical > 0.0
    tokens = [[metrics.tokenize(r) for r in refs[0]]]
    hyp = [metrics.tokenize("The Eagle is a pricey coffee shop near Burger King.")]
    assert one_changed == pytest.approx(corpus_nist(tokens, hyp, n=5))


def test_nist_short_hypotheses_do_not_crash():
    from nltk.translate.nist_score import corpus_nist

    # nltk divides by zero at orders no hypothesis reaches; those orders contribute nothing
    score = metrics.nist(["yes", "no way"], [["yes"], ["no way at all"]])
    assert score == pytest.approx(
        corpus_nist([[["yes"]], [["no", "way", "at", "all"]]], [["yes"], ["no", "way"]], n=2)
    )
    assert metrics.nist([""], [["anything"]]) == 0.0


class _NoSynonymWordNet:
    """Stands in for WordNet so METEOR's exact and stem stages can be checked without the corpus."""

    def synsets(self, word):
        return []


def test_meteor_by_hand_with_stub_wordnet(monkeypatch):
    monkeypatch.setattr(metrics, "_wordnet", lambda: _NoSynonymWordNet())
    # identical 4 tokens: P = R = 1, one chunk over 4 matches -> penalty 0.5 * (1/4)^3
    assert metrics.meteor(["the cat sat down"], [["the cat sat down"]]) == pytest.approx(100 * (1 - 0.5 / 64))


def test_meteor_without_wordnet_is_none(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_wordnet", lambda: None)
    with caplog.at_level(logging.WARNING, logger="qatune"):
        assert metrics.meteor(["the cat"], [["the cat"]]) is None
    assert any("WordNet" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_cider_d_by_hand():
    # Two examples, so every idf is log(2) - log(1) = L. Example 1 ("a b" vs "a b"): cosine 1 for
    # orders 1 and 2, 0 for 3 and 4, same length -> 10 * 2/4 = 5. Example 2 ("c" vs "c d"): order 1
    # cosine L*L / (L * sqrt(2) L) = 1/sqrt(2), others 0, length gap 1 -> exp(-1 / (2 * 6^2)).
    second = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert metrics.cider(["a b", "c"], [["a b"], ["c d"]]) == pytest.approx((5.0 + second) / 2)


def test_cider_d_matches_pycocoevalcap_value():
    # Reference value from pycocoevalcap 1.2 Cider().compute_score on the same corpus joined from
    # metrics.tokenize's tokens (a random 300-corpus comparison agreed to 2e-16).
    predictions = [
        "The Eagle is a cheap coffee shop near Burger King.",
        "Fitzbillies serves Italian food.",
        "Zizzi is a pub.",
    ]
    references = [
        [
            "The Eagle is a low-priced coffee shop near Burger King.",
            "Near Burger King, The Eagle coffee shop is cheap.",
        ],
        [
            "Fitzbillies is an Italian restaurant.",
            "Italian food is served at Fitzbillies.",
            "Fitzbillies offers Italian food.",
        ],
        ["Zizzi is a family-friendly pub."],
    ]
    assert metrics.cider(predictions, references) == pytest.approx(3.4850014480622917, rel=1e-12)


def test_cider_single_example_corpus_is_zero():
    # idf = log(1) - log(1) for every reference n-gram: the documented CIDEr-D behaviour
    assert metrics.cider(["a b"], [["a b"]]) == 0.0


def test_generation_scores_reports_each_metric(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_wordnet", lambda: None)
    predictions, references = (
        ["the cat sat on the mat", "a dog"],
        [["the cat sat on the mat"], ["a dog", "the dog"]],
    )
    with caplog.at_level(logging.WARNING, logger="qatune"):
        scores = metrics.generation_scores(predictions, references)
    assert any("METEOR skipped" in r.getMessage() for r in caplog.records)
    assert set(scores) == {"bleu", "rouge_l", "nist", "meteor", "cider", "n"}
    assert scores["n"] == 2 and scores["meteor"] is None
    assert scores["bleu"] == pytest.approx(metrics.bleu(predictions, references))
    assert scores["rouge_l"] == pytest.approx(100.0)
    assert scores["nist"] > 0 and scores["cider"] > 0


def test_missing_package_names_pip_package_and_becomes_none(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_wordnet", lambda: None)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    with pytest.raises(metrics.MissingDependencyError, match="pip install sacrebleu"):
        metrics.bleu(["a"], [["a"]])
    with caplog.at_level(logging.WARNING, logger="qatune"):
        assert metrics.generation_scores(["a b"], [["a b"]])["bleu"] is None
    assert any("pip install sacrebleu" in r.getMessage() for r in caplog.records)


def test_meteor_in_this_environment_never_crashes():
    # whether or not WordNet data is installed here: a percentage, or None with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = metrics.meteor(["the cat sat"], [["the cat sat"]])
    assert score is None or 0.0 <= score <= 100.0
