"""Our loop rules (loops.py) against docling's own classes, on the same few hundred generated strings: the blocks
against the matches of ``DocTagsRepetitionStopper``'s expression, the block rule against its ``should_stop``, the tail
rule against ``TailRepetitionStopper`` / ``find_repeated_tail`` / ``strip_repeated_tail``, and :func:`loops` on an
answer against docling's transformers stopping criterion (``HFStoppingCriteriaWrapper``) on its tokens. Runs in
``make test-docling`` (docling installed)."""

from __future__ import annotations

import random

import pytest

from granite_docling.evaluation.loops import blocks, loops, repeated_blocks, repeated_tail, strip_repeated_tail

TAGS = ("text", "section_header_level_1", "list_item", "caption", "formula", "page_footer")
TEXTS = ("", "Same line", "Total", "•", "x ^ { 2 }", "Figure 1.", "Lorem ipsum dolor sit amet, consectetur")
UNITS = ("\\quad ", "\\\\ ", "0", "& ", "<fcel>0<nl>", "ab", "- ", " \\hline", "<fcel>x<fcel>y<fcel>z<ecel><nl>")


def _box(rng: random.Random, kind: str, k: int, base: tuple[int, int, int, int], step: int) -> tuple:
    x, y, w, h = base
    if kind == "same":
        return base
    if kind == "down":  # x and w fixed, y advancing (regularly, or with a jitter near docling's 20% tolerance)
        return (x, y + k * step + rng.choice((0, 0, 1, -1, step // 5, -(step // 5) - 1)), w, h)
    if kind == "across":
        return (x + k * step + rng.choice((0, 0, 1, step // 5 + 1)), y, w, h)
    return tuple(rng.randint(0, 500) for _ in range(4))  # anywhere


def doctags_case(rng: random.Random) -> str:
    """A page answer: a few distinct blocks, then runs of blocks of one tag and text with boxes that repeat,
    advance regularly or irregularly, or fall anywhere; sometimes wrapped in a list, cut mid-block, or closed."""
    parts = ["<doctag>"]
    for _ in range(rng.randint(0, 3)):
        parts.append(f"<text><loc_{rng.randint(0, 500)}><loc_{rng.randint(0, 500)}><loc_{rng.randint(0, 500)}>"
                     f"<loc_{rng.randint(0, 500)}>{rng.choice(TEXTS)} {rng.randint(0, 99)}</text>")  # fmt: skip
    for _ in range(rng.randint(1, 3)):
        tag = rng.choice(TAGS)
        text = rng.choice(TEXTS)
        kind = rng.choice(("same", "down", "across", "anywhere"))
        base = tuple(rng.randint(0, 300) for _ in range(4))
        step = rng.randint(1, 40)
        wrap = tag == "list_item" and rng.random() < 0.5
        parts.append("<unordered_list>" if wrap else "")
        for k in range(rng.randint(1, 6)):
            x, y, w, h = _box(rng, kind, k, base, step)
            parts.append(f"<{tag}><loc_{x}><loc_{y}><loc_{w}><loc_{h}>{text}</{tag}>")
        parts.append("</unordered_list>" if wrap and rng.random() < 0.5 else "")
    answer = "".join(parts) + ("</doctag>" if rng.random() < 0.3 else "")
    return answer[: rng.randint(len(answer) // 2, len(answer))] if rng.random() < 0.3 else answer


def tail_case(rng: random.Random) -> str:
    """Text ending in a unit repeated around docling's thresholds (16 repeats, 320 characters), maybe mid-unit."""
    unit = (
        rng.choice(UNITS) if rng.random() < 0.7 else "".join(rng.choice("ab \\{}") for _ in range(rng.randint(1, 70)))
    )
    repeats = rng.choice((2, 8, 15, 16, 17, 30, 80, 400 // len(unit), 320 // len(unit), 320 // len(unit) + 1))
    text = "x = \\frac{a}{b} " * rng.randint(0, 3) + unit * repeats
    return text[: len(text) - rng.randint(0, len(unit) - 1)] if rng.random() < 0.4 else text


SOUP = (
    "<text>",
    "</text>",
    "<a>",
    "</a>",
    "<loc_12>",
    "<loc_3>",
    "<loc_7><loc_7><loc_7><loc_7>",
    "<loc_\u0661\u0662>",
    " ",
    "\n",
    "x",
    "<",
    ">",
    "<list_item>",
    "</list_item>",
    "<fcel>",
    "<nl>",
    "<Text>",
    "</text >",
    "<loc_5 >",
)


def soup_case(rng: random.Random) -> str:
    """Pieces of DocTags in any order: whitespace and text before the box, nested and unclosed tags, five boxes in
    a row, Arabic-Indic digits, near-misses of tags: where a hand-written reading of the expression would slip."""
    return "".join(rng.choice(SOUP) for _ in range(rng.randint(5, 80)))


def cases(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    makers = (tail_case, doctags_case, soup_case)
    return [makers[i % 3](rng) for i in range(n)]


@pytest.fixture(scope="module")
def docling_rules():
    pytest.importorskip("docling", reason="docling is not installed (make test-docling)")
    from docling.models.utils import generation_utils

    return generation_utils


@pytest.mark.slow
def test_the_cases_cover_both_verdicts_of_both_rules(docling_rules):
    strings = cases()
    blocks = [docling_rules.DocTagsRepetitionStopper().should_stop(s) for s in strings]
    tails = [docling_rules.TailRepetitionStopper().should_stop(s) for s in strings]
    assert 20 < sum(blocks) < len(strings) - 20 and 20 < sum(tails) < len(strings) - 20, (sum(blocks), sum(tails))


@pytest.mark.slow
def test_our_rules_equal_doclings_on_the_same_strings(docling_rules):
    pattern = docling_rules.DocTagsRepetitionStopper()._PATTERN
    for s in cases():
        theirs = [(m["tag"], tuple(int(m[k]) for k in "xywh"), m["text"], *m.span()) for m in pattern.finditer(s)]
        assert [(b.tag, b.box, b.text, b.start, b.end) for b in blocks(s)] == theirs, s
        assert repeated_blocks(s) == docling_rules.DocTagsRepetitionStopper().should_stop(s), s
        unit = docling_rules.find_repeated_tail(s, min_repeats=16, min_span=320, max_unit=64)
        assert repeated_tail(s) == unit, s
        assert (repeated_tail(s) is not None) == docling_rules.TailRepetitionStopper().should_stop(s), s
        if unit is not None:
            assert strip_repeated_tail(s, unit) == docling_rules.strip_repeated_tail(s, unit), s


@pytest.mark.slow
def test_an_answers_verdict_equals_doclings_transformers_stopping_criteria_on_its_tokens(docling_rules):
    import torch
    from docling.models.utils.hf_stopping_criteria import HFStoppingCriteriaWrapper
    from transformers import AutoTokenizer

    from granite_docling.model import ASSETS_DIR

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR)
    criteria = [
        HFStoppingCriteriaWrapper(tokenizer, docling_rules.DocTagsRepetitionStopper()),  # the whole text
        HFStoppingCriteriaWrapper(tokenizer, docling_rules.TailRepetitionStopper()),  # the last 640 tokens
    ]
    for s in cases():
        ids = torch.tensor([tokenizer.encode(s, add_special_tokens=False)])
        assert (loops(s) is not None) == any(bool(c(ids, None)[0]) for c in criteria), s
