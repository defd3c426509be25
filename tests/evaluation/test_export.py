"""DocTags answers -> per-page documents and files; report tables and comparisons on hand-made numbers."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from granite_docling.evaluation.export import export_answer, pages_to_document, split_pages
from granite_docling.evaluation.records import Record, compare_metrics
from granite_docling.evaluation.report import metrics_table, pick_examples

TWO_PAGES = (
    "<doctag><title><loc_50><loc_40><loc_450><loc_60>First</title>"
    "<page_break><text><loc_50><loc_40><loc_450><loc_60>Second page text</text></doctag>"
)


def test_a_multi_page_answer_splits_into_one_doctag_per_page():
    assert split_pages(TWO_PAGES) == [
        "<doctag><title><loc_50><loc_40><loc_450><loc_60>First</title></doctag>",
        "<doctag><text><loc_50><loc_40><loc_450><loc_60>Second page text</text></doctag>",
    ]
    assert split_pages("<doctag><text>x</text></doctag>") == ["<doctag><text>x</text></doctag>"]


def test_pages_become_one_document_with_its_pages():
    images = [Image.new("RGB", (612, 792), "white"), Image.new("RGB", (612, 792), "white")]
    doc = pages_to_document(split_pages(TWO_PAGES), images)
    assert sorted(doc.pages) == [1, 2]
    assert doc.pages[1].size.width == 612
    assert "First" in doc.export_to_markdown(page_no=1) and "Second" not in doc.export_to_markdown(page_no=1)
    assert "Second page text" in doc.export_to_markdown(page_no=2)


def test_more_page_breaks_than_images_still_export(tmp_path: Path):
    written = export_answer(tmp_path, "doc", TWO_PAGES, [Image.new("RGB", (100, 100))])
    names = {p.name for p in written}
    assert {"page_001.md", "page_002.html", "doc.md", "doc.html", "doc.doctags", "doc.json"} <= names
    assert "Second page text" in (tmp_path / "page_002.md").read_text()


def _block(n, **means):
    return {"n": n, **{k: {"mean": v, "median": v, "n": n} for k, v in means.items()}}


def test_comparison_deltas_and_direction():
    after = {"overall": _block(4, edit_distance=0.2, f1=0.9, teds=None)}
    before = {"overall": _block(4, edit_distance=0.5, f1=0.95, teds=None)}
    rows = compare_metrics(after, before)["overall"]
    assert rows["edit_distance"]["delta"] == -0.3 and rows["edit_distance"]["better"] is True
    assert round(rows["f1"]["delta"], 6) == -0.05 and rows["f1"]["better"] is False
    assert rows["teds"] == {"before": None, "after": None, "delta": None, "better": None}


def test_metrics_table_has_a_column_per_group():
    table = metrics_table({"overall": _block(3, f1=0.5), "docs": _block(2, f1=0.25)})
    assert "| metric | overall | docs |" in table
    assert "| samples | 3 | 2 |" in table and "| f1 ↑ | 0.5000 | 0.2500 |" in table


def test_examples_are_taken_from_every_dataset():
    records = [Record(str(i), "a" if i < 5 else "b", None, "", "", "", True) for i in range(7)]
    assert [r.id for _, r in pick_examples(records, 3)] == ["0", "1", "5"]
