"""Tests for ``granite-docling sample-data`` (tools/sample_data.py): format, round trip, pixels, seeds."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from docling_core.types.doc import ContentLayer, DocItemLabel, DoclingDocument
from docling_core.types.doc.document import DocTagsDocument
from PIL import Image

from granite_docling.cli import main
from granite_docling.tools.prepare import PrepareError
from granite_docling.tools.sample_data import (
    plan_documents,
    synth_document,
    synth_formula,
    write_sample_data,
)
from granite_docling.tools.synth_pages import PAGE_HEIGHT, PAGE_WIDTH

LOCS = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
ALL_LAYERS = {ContentLayer.BODY, ContentLayer.FURNITURE}


def item_signature(doc: DoclingDocument) -> list[tuple]:
    """What must survive DocTags: label, text, page, header level, code language, table text grid, in order."""
    signature = []
    for item, _ in doc.iterate_items(included_content_layers=ALL_LAYERS):
        if item.label == DocItemLabel.TABLE:
            content = tuple(tuple(cell.text for cell in row) for row in item.data.grid)
        else:
            content = item.text
        extra = getattr(item, "level", None) or getattr(item, "code_language", None)
        signature.append((item.label, content, item.prov[0].page_no, extra))
    return signature


def parse_doctags(answer: str, images: list[Image.Image]) -> DoclingDocument:
    pages = answer.removeprefix("<doctag>").removesuffix("</doctag>").split("<page_break>\n")
    pairs = DocTagsDocument.from_doctags_and_image_pairs([f"<doctag>{page}</doctag>" for page in pages], images)
    return DoclingDocument.load_from_doctags(pairs)


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, str]:
    """The acceptance run: 20 pages + 20 formulas through the CLI, with its wall time and printed output."""
    root, out = tmp_path_factory.mktemp("sample-data"), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(["sample-data", str(root), "--pages", "20", "--formulas", "20", "--seed", "0"])
    assert code == 0
    return root, time.perf_counter() - start, out.getvalue()


def test_twenty_pages_and_twenty_formulas_in_under_a_minute(sample_data: tuple[Path, float, str]) -> None:
    root, elapsed, printed = sample_data
    assert elapsed < 60
    assert len(list((root / "images/train").glob("synth_doc_*.png"))) == 20
    assert len(list((root / "anns/train").glob("synth_formula_*.json"))) == 20
    assert f"to {root}" in printed and "20 page(s)" in printed


def test_doctags_parse_back_into_the_generated_documents(sample_data: tuple[Path, float, str]) -> None:
    root, _, _ = sample_data
    labels = set()
    for index, n_pages in enumerate(plan_documents(20, seed=0)):
        record = json.loads((root / "anns/train" / f"synth_doc_{index:05d}.json").read_text())
        images = [Image.open(root / path) for path in record["img_pth"]]
        generated = synth_document(0, index, n_pages).doc
        answer = record["anns"][0]["assistant"]

        assert answer == generated.export_to_doctags()  # no empty pages: DoclingMatix's join is docling's export
        parsed = parse_doctags(answer, images)
        assert item_signature(parsed) == item_signature(generated)
        assert len(parsed.pages) == n_pages
        labels |= {str(label) for label, *_ in item_signature(parsed)}
    kinds = {"title", "section_header", "text", "list_item", "table", "formula", "code", "page_header", "page_footer"}
    assert kinds <= labels


@pytest.mark.parametrize("index", [0, 1, 2])
def test_ink_lies_inside_the_boxes_and_every_box_has_ink(index: int) -> None:
    synthetic = synth_document(seed=0, index=index, n_pages=2, scale=2.0)
    for page_no, image in enumerate(synthetic.images, start=1):
        dark = np.asarray(image.convert("L")) < 128  # (H, W); code backgrounds are light and stay out
        covered = np.zeros_like(dark)
        for item, _ in synthetic.doc.iterate_items(included_content_layers=ALL_LAYERS):
            if item.prov[0].page_no != page_no:
                continue
            box = item.prov[0].bbox.to_top_left_origin(PAGE_HEIGHT)
            left, top, right, bottom = (round(v * 2.0) for v in (box.l, box.t, box.r, box.b))
            assert dark[top:bottom, left:right].any(), f"nothing drawn in the box of {item.label}"
            covered[max(top - 2, 0) : bottom + 2, max(left - 2, 0) : right + 2] = True
        assert image.size == (round(PAGE_WIDTH * 2), round(PAGE_HEIGHT * 2))
        assert not (dark & ~covered).any(), f"page {page_no}: ink outside every box"


def test_formula_answer_is_synthformulanet_form_and_boxes_the_ink() -> None:
    formula = synth_formula(seed=0, index=3)
    match = re.fullmatch(r"((?:<loc_\d+>){4})(.+)</formula>", formula.answer)
    assert match and match.group(2) == formula.latex
    # SynthFormulaNet's normal form: single spaces between symbols, braces and digits stand alone.
    assert formula.latex == " ".join(formula.latex.split())
    assert re.search(r"\S[{}]|[{}]\S|\d\d", formula.latex) is None
    x0, y0, x1, y1 = (int(v) for v in LOCS.fullmatch(match.group(1)).groups())
    rows, cols = np.nonzero(np.asarray(formula.image.convert("L")) < 255)  # any ink, antialiased edges too
    width, height = formula.image.size
    expected = (cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height)
    for loc, value in zip((x0, y0, x1, y1), expected, strict=True):
        assert abs(loc - min(round(500 * value), 499)) <= 1


def test_easy_formulas_are_short_flat_and_over_eighteen_symbols() -> None:
    formulas = [synth_formula(seed=5, index=i, easy=True) for i in range(60)]
    relations, operators = {"=", r"\leq", r"\geq", r"\neq", r"\approx"}, {"+", "-", r"\cdot", r"\times", r"\pm"}
    symbols = set("abcxyz123456789") | {r"\alpha", r"\beta", r"\pi"}
    for formula in formulas:
        lhs, relation, *rhs = formula.latex.split()
        assert lhs in symbols and relation in relations
        assert rhs[::2] and set(rhs[::2]) <= symbols and set(rhs[1::2]) <= operators and len(rhs) <= 5
        assert re.fullmatch(r"(?:<loc_\d+>){4}.+</formula>", formula.answer)
    assert len({formula.latex for formula in formulas}) > 50
    # without easy, the same index draws the SynthFormulaNet-like formula it always did (seeded data keeps its bytes)
    assert synth_formula(seed=0, index=3).latex == r"\Delta ^ { 2 2 } \approx \sum _ { i = 1 } ^ { n } \bar { E }"


def test_cli_writes_easy_formulas(tmp_path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["sample-data", str(tmp_path), "--pages", "0", "--formulas", "3", "--easy-formulas"]) == 0
    answers = [json.loads(path.read_text())["anns"]["assistant"] for path in sorted(tmp_path.glob("anns/train/*.json"))]
    assert answers == [synth_formula(seed=0, index=i, easy=True).answer for i in range(3)]


def test_writes_the_docling_folder_format(tmp_path: Path) -> None:
    summary = write_sample_data(tmp_path, pages=5, formulas=2, seed=3, qa_turns=2)
    assert summary["pages"] == 5 and summary["formulas"] == 2
    docs = sorted((tmp_path / "anns/train").glob("synth_doc_*.json"))
    assert len(docs) == summary["documents"] == len(plan_documents(5, seed=3))
    n_pages = 0
    for path in docs:
        record = json.loads(path.read_text())
        assert isinstance(record["img_pth"], list) and isinstance(record["anns"], list)
        conversion = record["anns"][0]
        assert conversion["user"] == "Convert this page to docling."
        assert conversion["assistant"].count("<page_break>") == len(record["img_pth"]) - 1
        assert len(record["anns"]) <= 3 and all(turn["assistant"] for turn in record["anns"])
        for image_path in record["img_pth"]:
            assert (tmp_path / image_path).is_file() and image_path.startswith("images/train/synth_doc_")
        n_pages += len(record["img_pth"])
    assert n_pages == 5
    formula = json.loads((tmp_path / "anns/train/synth_formula_00001.json").read_text())
    assert formula["img_pth"] == "images/train/synth_formula_00001_0.png"
    assert formula["anns"]["user"] == "<formula>" and formula["anns"]["assistant"].endswith("</formula>")


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_sample_data(tmp_path / name, pages=3, formulas=2, seed=seed)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_existing_split_is_refused_unless_overwrite(tmp_path: Path) -> None:
    write_sample_data(tmp_path, pages=1, formulas=1, seed=0)
    with pytest.raises(PrepareError, match="--overwrite"):
        write_sample_data(tmp_path, pages=1, formulas=1, seed=0)
    write_sample_data(tmp_path, pages=1, formulas=0, seed=0, overwrite=True)
    assert not (tmp_path / "anns/train/synth_formula_00000.json").exists()  # stale samples are gone
    write_sample_data(tmp_path, pages=1, formulas=0, seed=0, split="val")  # another split is fine
    assert (tmp_path / "anns/val/synth_doc_00000.json").is_file()
