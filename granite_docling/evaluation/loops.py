"""Loops: answers that repeat themselves to the end, caught by the two rules docling applies at inference.

A looping model (the most reported failure of granite-docling, in every runtime) repeats a block or a short
piece of text until ``max_new_tokens``. docling stops such generations with two rules
(``docling/models/utils/generation_utils.py``, docling 2.141), written here as equal functions of our own
(``make test-docling`` checks them against docling's classes on a few hundred generated strings)::

    loops(answer)          # "repeated_blocks", "repeated_tail", or None
    without_loop(answer)   # the answer up to the first block of its repeated run, or without its repeated tail

* :func:`repeated_blocks`, docling's ``DocTagsRepetitionStopper``: the ``<tag>...<loc_x><loc_y><loc_w><loc_h>text
  </tag>`` blocks of its regular expression form consecutive runs of the same tag and text; a run of three or
  more loops when two of its boxes are equal, or x or w stays put while y advances regularly (every step within
  20% of the mean step), or y or h stays put while x advances regularly. docling's stopper sets no lookback of
  its own (its ``lookback_tokens=200`` is stored but never returned), so docling reads the whole generation with
  it, and so does :func:`loops`. The blocks are found by :func:`blocks`, which gives exactly the matches of
  docling's expression in linear time: the expression itself rescans the rest of the text from every unclosed
  tag (``<fcel>`` cells of a looping table: 3 s on a 33,000-character answer, at every generated token).
* :func:`repeated_tail`, docling's ``TailRepetitionStopper``: the text ends in a unit of at most 64 characters
  repeated over its last ``max(320, 16 x unit)`` characters (``\\quad \\quad ...``). docling's transformers
  engine reads the last 640 tokens with it, which hold at least those 1,024 characters unless the tokens average
  under 1.6 characters; :func:`loops` reads the answer's end.

A loop here is repetition at the END of an answer: one that ran into its budget, or that these rules stopped
(``eval.stop_loops``, generate.py, checks the growing answer with :func:`loops` every 32 tokens). A page answer
that closed with ``</doctag>`` does not count (the closed ``<doctag>`` is one block for docling's expression),
though docling, checking before the close, may have stopped it there.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

BLOCKS = "repeated_blocks"
TAIL = "repeated_tail"
RULES = (BLOCKS, TAIL)
"""The rule names :func:`loops` returns, in the order they are tried."""

TAIL_MIN_REPEATS = 16
TAIL_MIN_SPAN = 320  # characters
TAIL_MAX_UNIT = 64  # characters
SHORTEST_LOOP = 3 * len("<a><loc_0><loc_0><loc_0><loc_0></a>")  # characters: neither rule fires on fewer

_OPEN = re.compile(r"<([a-zA-Z0-9_]+)>")
_CLOSE = re.compile(r"</([a-zA-Z0-9_]+)>")
_BOX = re.compile(r"(?=<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>)")  # every start, overlapping ones too
_BOX_END = re.compile(r"<loc_\d+><loc_\d+><loc_\d+><loc_\d+>")


@dataclass(frozen=True)
class Block:
    """One match of docling's ``<tag>\\s*(prefix.*?)?<loc_x><loc_y><loc_w><loc_h>(text.*?)</tag>`` (DOTALL)."""

    tag: str
    box: tuple[int, int, int, int]
    text: str
    start: int
    end: int


def blocks(text: str) -> Iterator[Block]:
    """The blocks docling's expression finds in ``text``, in order (what its ``finditer`` yields).

    At an opening tag the shortest prefix reaches the first box after it, and the shortest text the first closing
    tag of the same name after that box; with no such closing tag no later box has one either, so the tag opens no
    block and the search goes on at the next opening tag. Box starts and closing tags are looked up by bisection.
    """
    box_starts = [match.start() for match in _BOX.finditer(text)]
    closes: dict[str, list[int]] = {}
    for match in _CLOSE.finditer(text):
        closes.setdefault(match[1], []).append(match.start())
    position = 0
    for opening in _OPEN.finditer(text):
        if opening.start() < position:
            continue  # inside the previous block
        tag = opening[1]
        k = bisect.bisect_left(box_starts, opening.end())
        if k == len(box_starts) or tag not in closes:
            continue
        box = _BOX_END.match(text, box_starts[k])
        assert box is not None
        ends = closes[tag]
        c = bisect.bisect_left(ends, box.end())
        if c == len(ends):
            continue
        numbers = _BOX.match(text, box_starts[k])
        assert numbers is not None
        x, y, w, h = (int(n) for n in numbers.groups())
        position = ends[c] + len(tag) + 3  # past "</tag>"
        yield Block(tag, (x, y, w, h), text[box.end() : ends[c]], opening.start(), position)


def _advances_regularly(values: Sequence[int]) -> bool:
    """Three or more strictly increasing values whose steps all lie within 20% of their mean step."""
    if len(values) < 3:
        return False
    steps = [later - earlier for earlier, later in zip(values, values[1:], strict=False)]
    if min(steps) <= 0:
        return False
    mean = sum(steps) / len(steps)
    return all(abs(step - mean) <= 0.2 * mean for step in steps)


def _run_loops(boxes: Sequence[tuple[int, int, int, int]]) -> bool:
    """Whether one run of same-tag, same-text blocks (their boxes, in order) is a loop."""
    if len(boxes) < 3:
        return False
    if len(set(boxes)) < len(boxes):
        return True
    xs, ys, ws, hs = (list(column) for column in zip(*boxes, strict=True))
    x_fixed, y_fixed, w_fixed, h_fixed = (len(set(column)) == 1 for column in (xs, ys, ws, hs))
    return ((x_fixed or w_fixed) and _advances_regularly(ys)) or ((y_fixed or h_fixed) and _advances_regularly(xs))


def looping_run(text: str) -> Block | None:
    """The first block of the first looping run of blocks in ``text``, or None."""
    runs: list[tuple[Block, list[tuple[int, int, int, int]]]] = []
    for block in blocks(text):
        if runs and (runs[-1][0].tag, runs[-1][0].text) == (block.tag, block.text):
            runs[-1][1].append(block.box)
        else:
            runs.append((block, [block.box]))
    return next((first for first, boxes in runs if _run_loops(boxes)), None)


def repeated_blocks(text: str) -> bool:
    """docling's ``DocTagsRepetitionStopper().should_stop(text)``."""
    return looping_run(text) is not None


def repeated_tail(
    text: str, min_repeats: int = TAIL_MIN_REPEATS, min_span: int = TAIL_MIN_SPAN, max_unit: int = TAIL_MAX_UNIT
) -> int | None:
    """The shortest unit (in characters) that ``text`` repeats at its end, or None: the last
    ``max(min_span, unit * min_repeats)`` characters have period ``unit``, the text perhaps ending mid-unit
    (docling's ``find_repeated_tail``)."""
    for unit in range(1, max_unit + 1):
        span = max(min_span, unit * min_repeats)
        if span > len(text):
            return None  # spans only grow with the unit
        tail = text[len(text) - span :]
        if tail[unit:] == tail[:-unit]:
            return unit
    return None


def strip_repeated_tail(text: str, unit: int) -> str:
    """``text`` without the tail that repeats every ``unit`` characters, followed back as far as it goes, and
    without the whitespace and the lone escaping backslash the cut may leave (docling's ``strip_repeated_tail``)."""
    start = (
        len(text) - unit
    )  # the last copy; a character before it belongs to the run while it equals the one a unit on
    while start > 0 and text[start - 1] == text[start - 1 + unit]:
        start -= 1
    kept = text[:start].rstrip()
    while (len(kept) - len(kept.rstrip("\\"))) % 2 == 1:  # an odd number of trailing backslashes: one escapes nothing
        kept = kept[:-1].rstrip()
    return kept


def loops(answer: str) -> str | None:
    """Which of docling's rules fires on ``answer`` (decoded with special tokens kept, up to eos):
    ``"repeated_blocks"``, ``"repeated_tail"``, or None when it does not loop."""
    if len(answer) < SHORTEST_LOOP:
        return None
    if repeated_blocks(answer):
        return BLOCKS
    if repeated_tail(answer) is not None:
        return TAIL
    return None


def without_loop(answer: str) -> str:
    """``answer`` without its loop: cut after the first block of its looping run, or stripped of its repeated
    tail as docling strips a looping formula or code answer; unchanged when it does not loop."""
    run = looping_run(answer)
    if run is not None:
        return answer[: run.end]
    unit = repeated_tail(answer)
    return answer if unit is None else strip_repeated_tail(answer, unit)
