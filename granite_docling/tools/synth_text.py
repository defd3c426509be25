"""Seeded text for synthetic samples: words, sentences and code listings, random LaTeX, and LaTeX rendered with
matplotlib's mathtext (no network, no data files: a fixed word list and matplotlib's bundled fonts)."""

from __future__ import annotations

import functools
import random
import re
from typing import TYPE_CHECKING

import numpy as np
from docling_core.types.doc.labels import CodeLanguageLabel

if TYPE_CHECKING:
    from matplotlib.mathtext import MathTextParser


MATH_FONTSETS = ("cm", "stix", "stixsans", "dejavuserif", "dejavusans")  # matplotlib mathtext font sets
WORDS = """
system model data value process result method analysis network energy control design signal average
structure function table sample level range factor measure report policy market cost price service customer
product quality support region period growth rate index account budget revenue capital asset risk return
project team member review plan task phase stage status update version release module layer input output
error loss training test baseline feature vector matrix linear sparse dense random stable robust simple
efficient accurate optimal initial final total partial local global internal external primary secondary
annual monthly weekly daily recent current previous future standard custom general specific common major
minor high low large small long short fast slow early late strong weak open closed public private central
material surface pressure temperature flow volume density velocity force mass heat power voltage current
sensor device circuit board frame unit panel valve pump motor engine bearing shaft gear bolt nut spring
document page section paragraph figure chart record field entry column row header footer title summary
patient study group treatment dose effect response outcome trial clinical protocol survey participant
water soil crop field yield seed plant harvest climate season region farm land irrigation nutrient storage
""".split()
SECTION_NAMES = (
    "Introduction",
    "Background",
    "Related Work",
    "Methods",
    "Experimental Setup",
    "Results",
    "Discussion",
    "Evaluation",
    "Implementation",
    "Limitations",
    "Conclusion",
    "Overview",
    "Maintenance",
    "Safety Notes",
)
GREEK = r"\alpha \beta \gamma \delta \epsilon \theta \lambda \mu \sigma \phi \omega \pi \rho \tau".split()
GREEK += r"\Gamma \Delta \Omega \Phi".split()
LETTERS = "abcdefghknmpqrstuvwxyzABCDEFGHKLMNPQRSTUVWXYZ"
BINARY_OPS = ("+", "+", "-", r"\cdot", r"\times", r"\pm")
RELATIONS = ("=", "=", "=", r"\leq", r"\geq", r"\neq", r"\approx")
FUNCTIONS = (r"\sin", r"\cos", r"\log", r"\exp", r"\tan")
ACCENTS = (r"\hat", r"\bar", r"\tilde", r"\vec")
IDENTIFIERS = "data items value total count result index scale offset limit buffer record weight score".split()


# ---------------------------------------------------------------- text, code and LaTeX from a seeded RNG


def sentence(rng: random.Random, n_words: int | None = None) -> str:
    """A capitalised sentence of vocabulary words, sometimes with a number or a comma."""
    words = rng.choices(WORDS, k=n_words or rng.randint(6, 16))
    if rng.random() < 0.3:
        words.insert(rng.randrange(1, len(words)), rng.choice([f"{rng.randint(2, 99)}%", str(rng.randint(2, 2024))]))
    if len(words) > 8 and rng.random() < 0.4:
        words[rng.randrange(3, len(words) - 2)] += ","
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(n_sentences))


def phrase(rng: random.Random, n_words: int) -> str:
    """A title-cased phrase, for titles and headings."""
    return " ".join(word.capitalize() for word in rng.choices(WORDS, k=n_words))


def code_snippet(rng: random.Random) -> tuple[CodeLanguageLabel, str]:
    """A short, plausible code listing in one of three languages."""
    a, b, c = rng.sample(IDENTIFIERS, 3)
    n = rng.randint(2, 64)
    m = rng.randint(2, 9)
    language = rng.choice([CodeLanguageLabel.PYTHON, CodeLanguageLabel.JAVASCRIPT, CodeLanguageLabel.SQL])
    if language == CodeLanguageLabel.PYTHON:
        lines = [f"def update_{a}({b}, {c}={m}):", f"    {a} = [x * {c} for x in {b}]"]
        lines += [f"    if len({a}) > {n}:", f"        {a} = {a}[:{n}]"] if rng.random() < 0.6 else []
        lines += [f"    return sum({a}) / max(len({a}), 1)"]
    elif language == CodeLanguageLabel.JAVASCRIPT:
        lines = [f"function update{a.capitalize()}({b}, {c}) {{", f"  const {a} = {b}.map((x) => x * {c});"]
        lines += [f"  if ({a}.length > {n}) return {a}.slice(0, {n});"] if rng.random() < 0.6 else []
        lines += [f"  return {a};", "}", f"console.log(update{a.capitalize()}([1, 2, 3], {m}));"]
    else:
        lines = [f"SELECT {a}, COUNT(*) AS n, AVG({b}) AS mean_{b}", f"FROM {c}_table", f"WHERE {b} > {n}"]
        lines += [f"GROUP BY {a}", "ORDER BY n DESC", f"LIMIT {m * 10};"]
    return language, "\n".join(lines)


def _number(rng: random.Random) -> str:
    return " ".join(str(rng.randint(1, 120)))  # digits are separate symbols in SynthFormulaNet's normal form


def _symbol(rng: random.Random) -> str:
    roll = rng.random()
    return rng.choice(LETTERS) if roll < 0.6 else rng.choice(GREEK) if roll < 0.85 else _number(rng)


def _term(rng: random.Random, depth: int) -> str:
    """One multiplicative term of a formula, nesting at most ``depth`` more levels."""
    symbol = _symbol(rng)
    if depth <= 0 or rng.random() < 0.3:
        return symbol
    return rng.choice(
        [
            lambda: f"{symbol} ^ {{ {_symbol(rng)} }}",
            lambda: f"{symbol} _ {{ {rng.choice(LETTERS)} }}",
            lambda: f"{rng.choice(LETTERS)} _ {{ {rng.choice('ijkn')} }} ^ {{ {_number(rng)} }}",
            lambda: rf"\frac {{ {_expression(rng, depth - 1)} }} {{ {_expression(rng, depth - 1)} }}",
            lambda: rf"\sqrt {{ {_expression(rng, depth - 1)} }}",
            lambda: rf"\left( {_expression(rng, depth - 1)} \right)",
            lambda: f"{rng.choice(FUNCTIONS)} ( {symbol} )",
            lambda: f"{rng.choice(ACCENTS)} {{ {rng.choice(LETTERS)} }}",
            lambda: rf"\mathcal {{ {rng.choice(LETTERS.upper())} }}",
        ]
    )()


def _expression(rng: random.Random, depth: int) -> str:
    terms = [_term(rng, depth) for _ in range(rng.randint(1, 3))]
    return f" {rng.choice(BINARY_OPS)} ".join(terms)


def random_latex(rng: random.Random) -> str:
    """A random display formula in SynthFormulaNet's normal form (every LaTeX symbol separated by a space)."""
    rhs = _expression(rng, depth=2)
    roll = rng.random()
    if roll < 0.15:
        rhs = rf"\sum _ {{ i = 1 }} ^ {{ n }} {rhs}"
    elif roll < 0.25:
        rhs = rf"\int _ {{ 0 }} ^ {{ \infty }} {rhs} d x"
    elif roll < 0.3:
        rhs = rf"\lim _ {{ n \rightarrow \infty }} {rhs}"
    return f"{_term(rng, depth=1)} {rng.choice(RELATIONS)} {rhs}"


EASY_LETTERS = "abcxyz"
EASY_GREEK = (r"\alpha", r"\beta", r"\pi")


def _easy_symbol(rng: random.Random) -> str:
    roll = rng.random()
    return rng.choice(EASY_LETTERS) if roll < 0.6 else rng.choice(EASY_GREEK) if roll < 0.85 else str(rng.randint(1, 9))


def easy_latex(rng: random.Random) -> str:
    """A short formula over 18 symbols (``x \\leq \\alpha + 3``): one relation, 1-3 symbols on its right, nothing
    nested. A task a small random model learns the form of in a few CPU minutes (``make demo``)."""
    terms = [_easy_symbol(rng) for _ in range(rng.randint(1, 3))]
    rhs = f" {rng.choice(BINARY_OPS)} ".join(terms)
    return f"{_easy_symbol(rng)} {rng.choice(RELATIONS)} {rhs}"


# ---------------------------------------------------------------- LaTeX rendering


@functools.lru_cache(maxsize=1)
def _math_parser() -> MathTextParser:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.mathtext import MathTextParser

    return MathTextParser("agg")


def render_latex(latex: str, size_pt: float, dpi: float, fontset: str) -> np.ndarray:
    """Ink coverage (H, W) uint8 of the formula, cropped to its ink; raises ValueError if mathtext rejects it."""
    from matplotlib.font_manager import FontProperties

    # mathtext attaches ``^``/``_`` to the token just before them, and a space is a token: glue the scripts on.
    source = re.sub(r"\s*([_^])\s*", r"\1", latex)
    # The fontset travels in FontProperties (not rcParams) because the parser caches results by its arguments.
    parsed = _math_parser().parse(f"${source}$", dpi=dpi, prop=FontProperties(size=size_pt, math_fontfamily=fontset))
    ink = np.asarray(parsed.image)
    rows, cols = np.nonzero(ink)
    if rows.size == 0:
        raise ValueError(f"formula renders empty: {latex}")
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
