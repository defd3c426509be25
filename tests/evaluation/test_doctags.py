"""DocTags <-> docling-core helpers: eos handling, conversion, Markdown, tables, boxes, OTSL -> HTML, tag checks."""

from pathlib import Path

import pytest
from docling_core.types.doc.document import DoclingDocument
from PIL import Image

from granite_docling.evaluation import doctags
from granite_docling.evaluation.doctags import (
    EOS_TOKEN,
    contains_doctags,
    doctags_to_document,
    document_boxes,
    document_markdown,
    document_tables,
    is_page_answer,
    is_well_formed,
    otsl_to_html,
    otsl_to_table,
    split_at_eos,
    tag_stream_errors,
    try_doctags_to_document,
)
from granite_docling.evaluation.layout import LabelledBox

REAL_DOCS = Path(__file__).parents[1] / "fixtures" / "real_docs"
PAPER_PAGE = (REAL_DOCS / "2305.03393v1-pg9.doctags.txt").read_text()

SMALL_PAGE = (
    "<doctag><section_header_level_1><loc_10><loc_20><loc_110><loc_40>Intro</section_header_level_1>"
    "<text><loc_10><loc_50><loc_490><loc_90>Hello world.</text>"
    "<otsl><loc_10><loc_100><loc_300><loc_200><ched>a<ched>b<nl><fcel>1<fcel>2<nl>"
    "<caption><loc_10><loc_205><loc_300><loc_215>Table 1. Numbers</caption></otsl>"
    "<page_footer><loc_240><loc_480><loc_260><loc_490>7</page_footer></doctag>"
)


def test_split_at_eos_cuts_padding_and_reports_the_stop():
    assert split_at_eos(f"<doctag></doctag>{EOS_TOKEN}{EOS_TOKEN}{EOS_TOKEN}") == ("<doctag></doctag>", True)
    assert split_at_eos("<doctag><text>cut off") == ("<doctag><text>cut off", False)


def test_page_answers_open_with_doctag():
    assert is_page_answer("  <doctag><text>x</text></doctag>")
    assert not is_page_answer("x^2 + y^2")
    assert not is_page_answer("<otsl><fcel>a<nl></otsl>")


def test_contains_doctags_recognises_markup_not_math():
    assert contains_doctags("<otsl><fcel>a<nl></otsl>")
    assert contains_doctags("<loc_12>")
    assert not contains_doctags("P < 0.05 and Q > 1")
    assert not contains_doctags(r"\frac{a}{b}")


def test_markdown_leaves_tables_out_but_keeps_captions_and_furniture():
    markdown = document_markdown(doctags_to_document(SMALL_PAGE))
    assert markdown == "## Intro\n\nHello world.\n\nTable 1. Numbers\n\n7"


def test_real_page_converts_and_its_table_is_parsed():
    doc = doctags_to_document(PAPER_PAGE)
    markdown = document_markdown(doc)
    assert "## 5.1 Hyper Parameter Optimization" in markdown
    assert "OTSL HTML" not in markdown  # a table cell: tables are scored by TEDS, not by the text metrics
    (table,) = document_tables(doc)
    assert (table.num_rows, table.num_cols) == (6, 8)


def test_boxes_are_on_the_loc_grid_with_docling_labels():
    boxes = document_boxes(doctags_to_document(SMALL_PAGE))
    # Captions are not among docling-core's DEFAULT_EXPORT_LABELS, so docling-eval's mAP leaves them out.
    assert boxes == [
        LabelledBox("section_header", 10, 20, 110, 40),
        LabelledBox("text", 10, 50, 490, 90),
        LabelledBox("table", 10, 100, 300, 200),
        LabelledBox("page_footer", 240, 480, 260, 490),
    ]


def test_boxes_do_not_depend_on_the_page_image_size():
    image = Image.new("RGB", (1224, 1584), "white")
    with_image = document_boxes(doctags_to_document(SMALL_PAGE, image))
    assert with_image == document_boxes(doctags_to_document(SMALL_PAGE))


def test_otsl_spans_become_colspan_and_rowspan():
    otsl = "<otsl><fcel>a<lcel><nl><fcel>b<fcel>c<nl><ucel><fcel>d<nl></otsl>"
    assert otsl_to_html(otsl) == (
        '<table><tr><td colspan="2">a</td></tr><tr><td rowspan="2">b</td><td>c</td></tr><tr><td>d</td></tr></table>'
    )


def test_otsl_empty_cells_headers_and_escaping():
    otsl = "<otsl><loc_1><loc_2><loc_3><loc_4><ched>x & y<ecel><nl><rhed>r<fcel>1<nl></otsl>"
    assert otsl_to_html(otsl) == "<table><tr><td>x &amp; y</td><td></td></tr><tr><td>r</td><td>1</td></tr></table>"
    table = otsl_to_table(otsl)
    assert (table.num_rows, table.num_cols) == (2, 2)


def test_ground_truth_pages_are_well_formed():
    for path in sorted(REAL_DOCS.glob("*.doctags.txt")):
        assert tag_stream_errors(path.read_text()) == [], path.name


def test_self_closing_markers_need_no_closing_tag():
    answer = (
        "<doctag><picture><loc_1><loc_2><loc_3><loc_4><pie_chart></picture>"
        "<code><loc_1><loc_2><loc_3><loc_4><_Python_>print(1)</code>"
        "<otsl><fcel>a<lcel><ucel><xcel><ecel><ched><rhed><srow><nl></otsl><page_break></doctag>"
    )
    assert is_well_formed(answer)


def test_unclosed_and_misnested_tags_are_reported():
    assert tag_stream_errors("<doctag><text>cut off by max_new_tokens") == [
        "<text> never closed",
        "<doctag> never closed",
    ]
    assert tag_stream_errors("<doctag><text>a<caption>b</text></doctag>") == ["<caption> not closed before </text>"]
    assert tag_stream_errors("<doctag></text></doctag>") == ["</text> closes nothing"]
    assert tag_stream_errors("<doctag><nl></nl></doctag>") == ["closing tag </nl> for a self-closing marker"]


def test_text_that_only_looks_like_markup_is_not_a_tag():
    assert is_well_formed("<doctag><text>P < 0.05 and x<y for <5 items</text></doctag>")


def test_rejected_doctags_raise_for_references_and_give_none_for_predictions(monkeypatch):
    def reject(*_args, **_kwargs):
        raise KeyError("broken")

    monkeypatch.setattr(doctags.DoclingDocument, "load_from_doctags", staticmethod(reject))
    with pytest.raises(ValueError, match="docling-core could not parse"):
        doctags_to_document("<doctag>")
    assert try_doctags_to_document("<doctag>") is None


def test_truncated_prediction_still_parses():
    doc = try_doctags_to_document("<doctag><text><loc_1><loc_2><loc_3><loc_4>Hello wor")
    assert isinstance(doc, DoclingDocument)
    assert len(document_boxes(doc)) == 1
