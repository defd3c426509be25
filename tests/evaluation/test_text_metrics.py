"""Text metrics on hand-computed cases: tokenisation, edit distance, set P/R/F1, BLEU-4, METEOR, exact match;
and the libraries behind them (rapidfuzz, nltk) against independent references."""

import math
import random
import warnings

import pytest
from nltk.translate.bleu_score import sentence_bleu
from rapidfuzz.distance import Levenshtein

from granite_docling.evaluation.text_metrics import (
    bleu,
    bleu_tokens,
    exact_match,
    meteor,
    normalized_edit_distance,
    set_precision_recall_f1,
    text_metrics,
    word_tokens,
)


def reference_levenshtein(a, b):
    """The textbook O(len(a) * len(b)) table, to check rapidfuzz's bit-parallel one against."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("kitten", "sitting", 3),
        (["the", "cat", "sat"], ["the", "sat"], 1),
        (["a", "b"], ["b", "a"], 2),  # no transpositions, as nltk.edit_distance
        ([], ["x", "y"], 2),
        ([], [], 0),
    ],
)
def test_levenshtein_hand_cases(a, b, expected):
    assert Levenshtein.distance(a, b) == expected
    assert Levenshtein.distance(b, a) == expected


def test_levenshtein_matches_the_textbook_table_beyond_one_machine_word():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 150))]
        b = [rng.randint(0, 3) for _ in range(rng.randint(0, 150))]
        assert Levenshtein.distance(a, b) == reference_levenshtein(a, b)


def test_levenshtein_on_word_tokens_matches_the_textbook_table():
    # rapidfuzz compares one-character strings by code point and longer ones by hash: mix both kinds.
    vocabulary = ["a", "b", ".", "the", "The", "tables", "table", "3.5", "``", "n't"]
    rng = random.Random(1)
    for _ in range(100):
        a = rng.choices(vocabulary, k=rng.randint(0, 120))
        b = rng.choices(vocabulary, k=rng.randint(0, 120))
        expected = reference_levenshtein(a, b)
        assert Levenshtein.distance(a, b) == expected
        assert normalized_edit_distance(a, b) == (expected / max(len(a), len(b)) if a or b else 0.0)


def test_normalized_edit_distance_divides_by_the_longer_sequence():
    # cat -> dog and an inserted "down": 2 edits over 4 tokens.
    assert normalized_edit_distance(["the", "cat", "sat"], ["the", "dog", "sat", "down"]) == 0.5
    assert normalized_edit_distance(["a"], ["a"]) == 0.0
    assert normalized_edit_distance(["a"], ["b", "c"]) == 1.0
    assert normalized_edit_distance([], []) == 0.0


def test_precision_recall_f1_on_token_sets():
    precision, recall, f1 = set_precision_recall_f1(["a", "b", "c"], ["b", "c", "d", "e"])
    assert (precision, recall) == (pytest.approx(2 / 3), 0.5)
    assert f1 == pytest.approx(4 / 7)  # 2 * (2/3 * 1/2) / (2/3 + 1/2)
    assert set_precision_recall_f1(["a", "a", "b"], ["b", "a"]) == (1.0, 1.0, 1.0)  # sets, not bags
    assert set_precision_recall_f1([], ["a"]) == (0.0, 0.0, 0.0)
    assert set_precision_recall_f1([], []) == (1.0, 1.0, 1.0)


def test_word_tokens_split_sentences_with_punkt_then_treebank():
    assert word_tokens('Hello world. Dr. Smith said "no". It costs 3.5% of it, don\'t it?') == [
        *["Hello", "world", ".", "Dr.", "Smith", "said", "``", "no", "''", "."],
        *["It", "costs", "3.5", "%", "of", "it", ",", "do", "n't", "it", "?"],
    ]


def test_bleu_tokens_follow_mteval_13a():
    assert bleu_tokens("Hello, world.") == ["Hello", ",", "world", "."]
    assert bleu_tokens("pages 3.5-4 (x&amp;y)") == ["pages", "3.5", "-", "4", "(", "x", "&", "y", ")"]
    assert bleu_tokens("hyphen-\nated\nline") == ["hyphenated", "line"]


def test_bleu_four_gram_precisions_by_hand():
    # 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; equal lengths, so no brevity penalty.
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu("the cat sat on a mat", "the cat sat on the mat") == pytest.approx(expected)


def test_bleu_brevity_penalty():
    # Every n-gram of the prediction matches; 4 tokens against 6 gives exp(1 - 6/4).
    assert bleu("the cat sat on", "the cat sat on the mat") == pytest.approx(math.exp(-0.5))


def test_bleu_has_no_smoothing():
    assert bleu("x = y", "x = y") == 0.0  # three tokens: no 4-gram can match
    assert bleu("a b c d e", "a b c x e") == 0.0  # no 4-gram in common
    assert bleu("same text here too", "same text here too") == 1.0


def test_bleu_is_nltk_sentence_bleu_where_every_precision_is_positive():
    words = "the cat sat on a mat , and the dog sat on the cat .".split()
    rng = random.Random(2)
    outcomes = []
    for _ in range(200):
        reference = rng.choices(words, k=rng.randint(1, 30))
        # Each word kept, dropped, replaced or doubled: from near copies to no 4-gram in common.
        prediction = [w for word in reference for w in rng.choice([[word]] * 3 + [[], [rng.choice(words)], [word] * 2])]
        prediction, reference = " ".join(prediction), " ".join(reference)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns where an n-gram order has no match
            expected = sentence_bleu([bleu_tokens(reference)], bleu_tokens(prediction))
        if expected > 1e-50:
            assert bleu(prediction, reference) == pytest.approx(expected, rel=1e-12)
        else:  # unsmoothed nltk returns ~1e-77 there; HF evaluate, docling-eval's BLEU, returns 0
            assert bleu(prediction, reference) == 0.0
        outcomes.append(expected > 1e-50)
    assert 20 < sum(outcomes) < 180


def test_bleu_empty_texts():
    assert bleu("", "") == 1.0
    assert bleu("", "some reference text here") == 0.0
    assert bleu("some prediction text here", "") == 0.0


def test_meteor_matches_porter_stems_without_wordnet():
    # All three words align (cats -> cat by stem) in one chunk: fmean 1, penalty 0.5 * (1/3)^3.
    assert meteor(["the", "cats", "sat"], ["the", "cat", "sat"]) == pytest.approx(1 - 0.5 / 27)
    assert meteor(["big"], ["large"]) == 0.0  # a WordNet synonym; no synonym stage offline
    assert meteor([], []) == 1.0
    assert meteor([], ["a"]) == 0.0


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" x^2 \n", "x^2") == 1.0
    assert exact_match("x^2", "x ^2") == 0.0


def test_text_metrics_of_a_text_against_itself():
    text = "We have chosen the PubTabNet data set. It includes a diverse set of tables."
    scores = text_metrics(text, text)
    assert scores["edit_distance"] == 0.0
    assert scores["precision"] == scores["recall"] == scores["f1"] == scores["bleu"] == 1.0
    # One chunk of n matches still pays METEOR's fragmentation penalty 0.5 * (1/n)^3.
    assert scores["meteor"] == pytest.approx(1 - 0.5 / len(word_tokens(text)) ** 3)


def test_text_metrics_of_empty_texts():
    assert text_metrics("", "") == {
        "edit_distance": 0.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "bleu": 1.0,
        "meteor": 1.0,
    }
    assert text_metrics("", "something") == {
        "edit_distance": 1.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "bleu": 0.0,
        "meteor": 0.0,
    }
