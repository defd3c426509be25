"""granite-docling predict on a real PDF and an image: DocTags, Markdown, HTML and JSON per page and document."""

from __future__ import annotations

import json

import pypdfium2
import pytest
from eval_helpers import save_tiny_checkpoint
from PIL import Image

from granite_docling.cli import main
from granite_docling.tools.pages import PageFileError, render_pages
from granite_docling.tools.predict import input_files, output_stems

REAL_DOCS = __import__("pathlib").Path(__file__).parents[1] / "fixtures" / "real_docs"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "final_model")


def test_predict_writes_every_page_and_the_whole_document(checkpoint, tmp_path, capsys):
    pdf = REAL_DOCS / "multi_page.pdf"
    image = tmp_path / "scan.png"
    Image.new("RGB", (300, 400), "white").save(image)
    out = tmp_path / "out"
    code = main(["predict", str(checkpoint), str(pdf), str(image), "--out", str(out), "--max-new-tokens", "4",
                 "--batch-size", "3"])  # fmt: skip
    assert code == 0
    n_pages = len(pypdfium2.PdfDocument(pdf))
    assert n_pages > 1
    for stem, pages in (("multi_page", n_pages), ("scan", 1)):
        folder = out / stem
        for number in range(1, pages + 1):
            for suffix in ("doctags", "md", "html"):
                assert (folder / f"page_{number:03d}.{suffix}").is_file(), f"{stem} page {number} .{suffix}"
        assert not (folder / f"page_{pages + 1:03d}.doctags").exists()
        for suffix in ("doctags", "md", "html", "json"):
            assert (folder / f"{stem}.{suffix}").is_file()
        document = json.loads((folder / f"{stem}.json").read_text())
        assert len(document["pages"]) == pages
        assert "<html" in (folder / f"{stem}.html").read_text()
    assert f"{out / 'multi_page'}" in capsys.readouterr().out


def test_pdf_pages_render_at_scale_two():
    [page] = render_pages(REAL_DOCS / "2305.03393v1-pg9.pdf")
    assert page.size == (1224, 1584) and page.mode == "RGB"  # a US-letter page at 144 dpi


def test_inputs_folders_and_clear_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "a.pdf").write_bytes((REAL_DOCS / "2305.03393v1-pg9.pdf").read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    assert input_files([tmp_path]) == [tmp_path / "a.pdf", tmp_path / "b.png"]
    with pytest.raises(PageFileError, match="no such file"):
        input_files([tmp_path / "missing.pdf"])
    with pytest.raises(PageFileError, match="not a PDF or an image"):
        input_files([tmp_path / "notes.txt"])
    assert output_stems([tmp_path / "x/a.pdf", tmp_path / "y/a.png", tmp_path / "b.pdf"]) == ["a", "a_2", "b"]
    assert main(["predict", "unused", str(tmp_path / "missing.pdf"), "--out", str(tmp_path / "o")]) == 2
