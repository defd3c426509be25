"""TEDS (tree-edit-distance similarity) for tables, with and without cell content.

TEDS = 1 - TED(reference, prediction) / max(|reference|, |prediction|), where the trees are
``table -> tr -> td`` (``th`` counts as ``td``), |tree| counts the elements below the root, inserting or deleting
a node costs 1, and renaming costs 1 unless tag, colspan and rowspan agree, in which case two cells cost the
normalised character-level Levenshtein distance of their contents (0 in structure-only mode).
This is docling-eval's definition (``docling_eval/evaluators/teds.py``, after Zhong et al., PubTabNet).

Who computes what: rapidfuzz the cells' content distance (docling-eval: the ``distance`` package, same numbers);
the tree edit distance is our Zhang-Shasha (``tree_edit_distance``), not the ``apted`` package that docling-eval
runs with the same costs. Both return the exact optimal distance (tests/evaluation/test_teds.py checks ours
against apted), but on these two-level trees Zhang-Shasha already does about cells x cells work, so apted's path
strategy buys nothing, and apted (pure Python, last released 2017) takes ~2.6x as long: 1.8 s against 0.7 s
for a 265-cell table (benchmarks/RESULTS.md, "Metric libraries"). TEDS is the slowest metric of a page with a
large table, so the seconds are worth more than the 75 lines.

Differences from docling-eval:
- Tables built from OTSL (``table_tree``) have no ``<tbody>`` or caption node. docling-eval goes through
  docling-core's ``TableItem.export_to_html``, which (docling-core 2.101) wraps rows in ``<tbody>`` and adds a
  ``<caption>``; those nodes shift the denominator by one or two. HTML input (``html_table_tree``) keeps whatever
  elements it has, as docling-eval does.
- Scores are clamped to [0, 1] (a very different table can otherwise go below 0) and not rounded to 3 decimals.
- Two empty tables score 1.0 instead of dividing by zero.

Usage::

    teds(reference_table_data, predicted_table_data)                  # with content
    teds(reference_table_data, predicted_table_data, structure_only=True)
    teds_html("<table><tr><td>a</td></tr></table>", predicted_html)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser

from docling_core.types.doc.document import TableData
from rapidfuzz.distance import Levenshtein

# docling-eval's TableEvaluator strips these formatting tags before parsing.
_FORMATTING_TAGS = frozenset({"b", "i", "u"})
_CELL_TAGS = frozenset({"td", "th"})
_VOID_TAGS = frozenset({"br", "hr", "img", "input", "wbr"})
# HTML ends an open row at the next row, and an open row group at the next group (lxml's parser does the same).
_ROW_GROUPS = frozenset({"thead", "tbody", "tfoot"})
_IMPLICITLY_CLOSES = {"tr": frozenset({"tr"})} | dict.fromkeys(_ROW_GROUPS, _ROW_GROUPS | {"tr"})


@dataclass
class TableNode:
    """A node of a table tree. Cells carry their content as a tuple of characters (plus ``<tag``/``</tag>`` tokens
    for markup inside the cell, which also counts in ``inner_elements``)."""

    tag: str
    colspan: int | None = None
    rowspan: int | None = None
    content: tuple[str, ...] = ()
    inner_elements: int = 0
    children: list[TableNode] = field(default_factory=list)


def table_tree(table: TableData, *, with_content: bool = True) -> TableNode:
    """The TEDS tree of a TableData grid: one ``tr`` per row, one ``td`` per cell in the row where it starts."""
    root = TableNode("table")
    for row in range(table.num_rows):
        cells = sorted(
            (cell for cell in table.table_cells if cell.start_row_offset_idx == row),
            key=lambda cell: cell.start_col_offset_idx,
        )
        root.children.append(
            TableNode(
                "tr",
                children=[
                    TableNode("td", cell.col_span, cell.row_span, tuple(cell.text) if with_content else ())
                    for cell in cells
                ],
            )
        )
    return root


def html_table_tree(table_html: str, *, with_content: bool = True) -> TableNode:
    """The TEDS tree of the first ``<table>`` in an HTML string (ValueError if there is none)."""
    builder = _TableTreeBuilder(with_content)
    builder.feed(table_html)
    builder.close()
    if builder.root is None:
        raise ValueError(f"no <table> element in {table_html[:80]!r}")
    return builder.root


def tree_size(node: TableNode) -> int:
    """Number of elements in the tree, the root included."""
    return 1 + node.inner_elements + sum(tree_size(child) for child in node.children)


def rename_cost(a: TableNode, b: TableNode) -> float:
    """docling-eval's CustomConfig.rename: 1 for a different tag or span, else the cells' normalised content
    distance."""
    if a.tag != b.tag or a.colspan != b.colspan or a.rowspan != b.rowspan:
        return 1.0
    if a.tag == "td" and a.content != b.content:
        return Levenshtein.normalized_distance(a.content, b.content)
    return 0.0


def tree_edit_distance(a: TableNode, b: TableNode) -> float:
    """Ordered tree edit distance (Zhang & Shasha 1989) with unit insert / delete and rename_cost."""
    nodes_a, leftmost_a = _postorder(a)
    nodes_b, leftmost_b = _postorder(b)
    rename_cache: dict[tuple[int, int], float] = {}
    tree_dist = [[0.0] * len(nodes_b) for _ in nodes_a]
    keyroots_b = _keyroots(leftmost_b)
    for i in _keyroots(leftmost_a):
        for j in keyroots_b:
            if leftmost_a[i] == i and leftmost_b[j] == j:
                # Two leaves (most pairs: cell against cell): renaming costs at most 1 < delete + insert.
                tree_dist[i][j] = rename_cache[(i, j)] = rename_cost(nodes_a[i], nodes_b[j])
            else:
                _forest_distance(i, j, nodes_a, nodes_b, leftmost_a, leftmost_b, tree_dist, rename_cache)
    return tree_dist[-1][-1]


def teds_trees(reference: TableNode, prediction: TableNode) -> float:
    """TEDS of two table trees, in [0, 1]."""
    num_nodes = max(tree_size(reference), tree_size(prediction)) - 1
    if num_nodes == 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - tree_edit_distance(reference, prediction) / num_nodes))


def teds(reference: TableData, prediction: TableData, *, structure_only: bool = False) -> float:
    """TEDS of two TableData grids (see the module docstring)."""
    with_content = not structure_only
    return teds_trees(
        table_tree(reference, with_content=with_content), table_tree(prediction, with_content=with_content)
    )


def teds_html(reference_html: str, prediction_html: str, *, structure_only: bool = False) -> float:
    """TEDS of two HTML tables (see the module docstring)."""
    with_content = not structure_only
    return teds_trees(
        html_table_tree(reference_html, with_content=with_content),
        html_table_tree(prediction_html, with_content=with_content),
    )


def paired_teds(
    reference: Sequence[TableData], prediction: Sequence[TableData], *, structure_only: bool = False
) -> float | None:
    """Mean TEDS over a page's tables paired in order; None when the reference has no table.

    A missing or extra predicted table scores 0 in its slot. docling-eval instead skips a whole page whose table
    count differs, which would reward leaving a table out.
    """
    if not reference:
        return None
    scores = [teds(ref, pred, structure_only=structure_only) for ref, pred in zip(reference, prediction, strict=False)]
    scores += [0.0] * (max(len(reference), len(prediction)) - len(scores))
    return sum(scores) / len(scores)


def _postorder(root: TableNode) -> tuple[list[TableNode], list[int]]:
    """Nodes in post-order and, for each, the post-order index of its leftmost leaf."""
    nodes: list[TableNode] = []
    leftmost: list[int] = []

    def visit(node: TableNode) -> int:
        first_leaf = None
        for child in node.children:
            child_leaf = visit(child)
            if first_leaf is None:
                first_leaf = child_leaf
        nodes.append(node)
        leftmost.append(len(nodes) - 1 if first_leaf is None else first_leaf)
        return leftmost[-1]

    visit(root)
    return nodes, leftmost


def _keyroots(leftmost: list[int]) -> list[int]:
    """The highest node of each distinct leftmost leaf: the roots whose forests Zhang-Shasha must solve."""
    highest = {leaf: index for index, leaf in enumerate(leftmost)}
    return sorted(highest.values())


def _forest_distance(
    i: int,
    j: int,
    nodes_a: list[TableNode],
    nodes_b: list[TableNode],
    leftmost_a: list[int],
    leftmost_b: list[int],
    tree_dist: list[list[float]],
    rename_cache: dict[tuple[int, int], float],
) -> None:
    """Fill tree_dist for every pair of subtrees on the leftmost paths of keyroots i and j.

    8 parameters: the Zhang-Shasha recurrence's inputs (the keyroot pair, both trees' nodes and leftmost leaves)
    and the two tables it fills and reads.
    """
    li = leftmost_a[i]
    lj = leftmost_b[j]
    rows = i - li + 2
    cols = j - lj + 2
    # forest[x][y]: distance between forests a[li..li+x-1] and b[lj..lj+y-1]; row / column 0 are empty forests.
    forest = [[0.0] * cols for _ in range(rows)]
    for x in range(1, rows):
        forest[x][0] = forest[x - 1][0] + 1
    for y in range(1, cols):
        forest[0][y] = forest[0][y - 1] + 1
    for x in range(1, rows):
        di = li + x - 1
        row = forest[x]
        above = forest[x - 1]
        for y in range(1, cols):
            dj = lj + y - 1
            if leftmost_a[di] == li and leftmost_b[dj] == lj:
                cost = rename_cache.get((di, dj))
                if cost is None:
                    cost = rename_cache[(di, dj)] = rename_cost(nodes_a[di], nodes_b[dj])
                best = min(above[y] + 1, row[y - 1] + 1, above[y - 1] + cost)
                tree_dist[di][dj] = best
            else:
                best = min(
                    above[y] + 1,
                    row[y - 1] + 1,
                    forest[leftmost_a[di] - li][leftmost_b[dj] - lj] + tree_dist[di][dj],
                )
            row[y] = best


class _TableTreeBuilder(HTMLParser):
    """Builds the TEDS tree of the first <table>, tokenising cell content like docling-eval's TEDScorer._tokenize:
    the cell's characters, with ``<tag`` / ``</tag>`` tokens for elements nested in the cell."""

    def __init__(self, with_content: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.with_content = with_content
        self.root: TableNode | None = None
        self._stack: list[TableNode] = []
        self._cell: TableNode | None = None
        self._cell_tokens: list[str] = []
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._done or tag in _FORMATTING_TAGS:
            return
        if self._cell is not None and tag in _CELL_TAGS | {"tr"}:
            self._close_cell()  # HTML lets a cell end implicitly at the next cell or row
        if self._cell is not None:
            self._cell.inner_elements += 1
            self._cell_tokens.append(f"<{tag}")
            if tag in _VOID_TAGS:
                self._cell_tokens.append(f"</{tag}>")
            return
        if self.root is None and tag != "table":
            return
        if tag in _IMPLICITLY_CLOSES:
            self._close_open(_IMPLICITLY_CLOSES[tag])
        attributes = dict(attrs)
        if tag in _CELL_TAGS:
            node = TableNode("td", _span(attributes.get("colspan")), _span(attributes.get("rowspan")))
            self._cell = node
            self._cell_tokens = []
        else:
            node = TableNode(tag)
        if self.root is None:
            self.root = node
        else:
            self._stack[-1].children.append(node)
        if tag not in _CELL_TAGS and tag not in _VOID_TAGS:
            self._stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        if self._done or tag in _FORMATTING_TAGS:
            return
        if self._cell is not None:
            if tag in _CELL_TAGS:
                self._close_cell()
                return
            if tag not in {"tr", "thead", "tbody", "tfoot", "table"}:
                if tag not in _VOID_TAGS:
                    self._cell_tokens.append(f"</{tag}>")
                return
            self._close_cell()
        names = [node.tag for node in self._stack]
        if tag in names:
            # Implicitly close anything left open inside it, as an HTML parser would.
            del self._stack[len(names) - 1 - names[::-1].index(tag) :]
        if self.root is not None and not self._stack:
            self._done = True

    def _close_open(self, tags: frozenset[str]) -> None:
        """Pop the elements that a new row or row group ends implicitly (never the table itself)."""
        while len(self._stack) > 1 and self._stack[-1].tag in tags:
            self._stack.pop()

    def _close_cell(self) -> None:
        assert self._cell is not None
        self._cell.content = tuple(self._cell_tokens) if self.with_content else ()
        self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._done:
            self._cell_tokens.extend(data)


def _span(value: str | None) -> int:
    try:
        return int(value) if value else 1
    except ValueError:
        return 1
