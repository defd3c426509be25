"""TEDS on hand-computed tables, through HTML and through OTSL, and the pairing of a page's tables; and our
Zhang-Shasha tree edit distance against apted with docling-eval's costs."""

import random
import re
from pathlib import Path

import pytest
from apted import APTED, Config
from nltk import edit_distance

from granite_docling.evaluation.doctags import doctags_to_document, document_tables, otsl_to_html, otsl_to_table
from granite_docling.evaluation.teds import (
    TableNode,
    html_table_tree,
    paired_teds,
    table_tree,
    teds,
    teds_html,
    tree_edit_distance,
    tree_size,
)

REFERENCE_HTML = "<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>2</td></tr></table>"
REFERENCE_OTSL = "<otsl><fcel>a<fcel>b<nl><fcel>1<fcel>2<nl></otsl>"
PAPER_PAGE = (Path(__file__).parents[1] / "fixtures" / "real_docs" / "2305.03393v1-pg9.doctags.txt").read_text()


class DoclingEvalConfig(Config):
    """docling-eval's CustomConfig (docling_eval/evaluators/teds.py): its rename cost, with nltk's edit distance in
    place of the ``distance`` package's (both plain Levenshtein)."""

    def rename(self, node1, node2):
        if node1.tag != node2.tag or node1.colspan != node2.colspan or node1.rowspan != node2.rowspan:
            return 1.0
        if node1.tag in ["td", "th"] and (node1.content or node2.content):
            return edit_distance(node1.content, node2.content) / max(len(node1.content), len(node2.content))
        return 0.0


def apted_distance(a: TableNode, b: TableNode) -> float:
    # docling-eval passes (prediction, reference); the costs are symmetric, so either order gives the distance.
    return APTED(a, b, DoclingEvalConfig()).compute_edit_distance()


def test_acceptance_case_html():
    # One of six nodes below the root differs in content by a whole character: 1 - 1/6; the structure is equal.
    prediction = REFERENCE_HTML.replace(">2<", ">3<")
    assert round(teds_html(REFERENCE_HTML, prediction), 3) == 0.833
    assert teds_html(REFERENCE_HTML, prediction, structure_only=True) == 1.0


def test_acceptance_case_otsl_matches_the_html_route():
    prediction = otsl_to_table(REFERENCE_OTSL.replace(">2<", ">3<"))
    assert otsl_to_html(REFERENCE_OTSL) == REFERENCE_HTML
    assert round(teds(otsl_to_table(REFERENCE_OTSL), prediction), 3) == 0.833
    assert teds(otsl_to_table(REFERENCE_OTSL), prediction, structure_only=True) == 1.0


def test_identical_tables_score_one():
    table = otsl_to_table("<otsl><ched>x<lcel><nl><fcel>1<fcel>2<nl><ucel><ecel><nl></otsl>")
    assert teds(table, table) == 1.0
    assert teds(table, table, structure_only=True) == 1.0


def test_partial_content_distance_is_normalised_by_the_longer_cell():
    # "abcd" vs "abxd": one substitution in four characters costs 0.25 of one node out of two.
    assert teds_html("<table><tr><td>abcd</td></tr></table>", "<table><tr><td>abxd</td></tr></table>") == 0.875


def test_an_extra_column_costs_two_insertions():
    prediction = "<table><tr><td>a</td><td>b</td><td>c</td></tr><tr><td>1</td><td>2</td><td>3</td></tr></table>"
    # Eight nodes below the prediction's root, two of them inserted.
    assert teds_html(REFERENCE_HTML, prediction) == 0.75
    assert teds_html(REFERENCE_HTML, prediction, structure_only=True) == 0.75


def test_a_missed_span_costs_a_rename_and_an_insertion():
    reference = otsl_to_table("<otsl><fcel>a<lcel><nl><fcel>b<fcel>c<nl></otsl>")
    prediction = otsl_to_table("<otsl><fcel>a<ecel><nl><fcel>b<fcel>c<nl></otsl>")
    # colspan 2 -> 1 renames (cost 1) and the empty cell is inserted (1): 2 edits over 6 nodes.
    assert teds(reference, prediction, structure_only=True) == pytest.approx(1 - 2 / 6)
    assert teds(reference, prediction) == pytest.approx(1 - 2 / 6)


def test_html_header_cells_sections_and_formatting():
    reference = "<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>1</td></tr></tbody></table>"
    prediction = "<table><thead><tr><td><b>a</b></td></tr></thead><tbody><tr><td><i>1</i></td></tr></tbody></table>"
    # th counts as td and <b>/<i> are stripped, as in docling-eval.
    assert teds_html(reference, prediction) == 1.0


def test_markup_inside_a_cell_is_content_and_counts_as_a_node():
    # Cell tokens [x, <sub, 2, </sub>] vs [x, 2]: 2 edits / 4; three elements below the larger root.
    assert teds_html(
        "<table><tr><td>x<sub>2</sub></td></tr></table>", "<table><tr><td>x2</td></tr></table>"
    ) == pytest.approx(1 - 0.5 / 3)


def test_html_cells_may_end_implicitly():
    tree = html_table_tree("<table><tr><td>a<td>b<tr><td>c</table>")
    assert [[cell.content for cell in row.children] for row in tree.children] == [[("a",), ("b",)], [("c",)]]


def test_html_without_a_table_is_an_error():
    with pytest.raises(ValueError, match="no <table>"):
        html_table_tree("<div>nothing</div>")


def test_tree_edit_distance_on_small_trees():
    def row(*texts):
        return TableNode("tr", children=[TableNode("td", 1, 1, tuple(text)) for text in texts])

    one = TableNode("table", children=[row("a", "b"), row("c")])
    swapped = TableNode("table", children=[row("c"), row("a", "b")])
    assert tree_size(one) == 6
    assert tree_edit_distance(one, one) == 0.0
    # Cheapest: rename the two leading cells' contents a->c, c->a (1 each) and move "b" (delete + insert).
    assert tree_edit_distance(one, swapped) == 4.0
    assert tree_edit_distance(one, TableNode("table")) == 5.0


def test_completely_different_tables_do_not_go_below_zero():
    wide = "<otsl>" + "<fcel>x" * 12 + "<nl></otsl>"
    tall = "<otsl>" + "<fcel>y<nl>" * 12 + "</otsl>"
    assert teds(otsl_to_table(wide), otsl_to_table(tall)) == 0.0


def test_page_tables_pair_in_order_and_unmatched_slots_score_zero():
    first, second = otsl_to_table(REFERENCE_OTSL), otsl_to_table("<otsl><fcel>z<nl></otsl>")
    assert paired_teds([first, second], [first, second]) == 1.0
    assert paired_teds([first, second], [first]) == 0.5  # a missed table
    assert paired_teds([first], [first, second]) == 0.5  # a hallucinated table
    assert paired_teds([], [first]) is None  # no reference table: TEDS does not apply


def test_tree_edit_distance_is_apted_on_random_tables():
    rng = random.Random(0)

    def cell():
        return TableNode("td", rng.choice([1, 1, 2]), rng.choice([1, 1, 2]), tuple(rng.choice(["", "a", "ab", "0.9"])))

    def table():
        rows = [TableNode("tr", children=[cell() for _ in range(rng.randint(1, 5))]) for _ in range(rng.randint(0, 6))]
        return TableNode("table", children=rows)

    for _ in range(150):
        a, b = table(), table()
        assert tree_edit_distance(a, b) == pytest.approx(apted_distance(a, b), abs=1e-9)


@pytest.mark.parametrize("structure_only", [False, True])
def test_tree_edit_distance_is_apted_on_the_real_table(structure_only):
    reference = document_tables(doctags_to_document(PAPER_PAGE))[0]
    # Misread numbers, a dropped data row and a header cell that lost its span.
    changed = re.sub(r"0\.9(\d)", r"0.8\1", PAPER_PAGE).replace("<fcel>2<fcel>4<fcel>OTSL HTML", "<fcel>2<fcel>4")
    start = changed.index("<fcel>4<fcel>2<fcel>")
    changed = changed[:start] + changed[changed.index("<nl>", start) + 4 :]
    changed = changed.replace("<ched>TEDs<lcel><lcel>", "<ched>TEDs<ched><lcel>")
    prediction = document_tables(doctags_to_document(changed))[0]
    a = table_tree(reference, with_content=not structure_only)
    b = table_tree(prediction, with_content=not structure_only)
    distance = tree_edit_distance(a, b)
    assert distance > 1.0
    assert distance == pytest.approx(apted_distance(a, b), abs=1e-9)
