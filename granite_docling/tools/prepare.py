"""Turn your own documents into training data in the Docling folder format: ``granite-docling prepare``.

    granite-docling prepare INPUT... --out OUT [--unit page|document] [--split train] [--scale 2.0] [--overwrite]

Each INPUT is a PDF or a page image with docling's DoclingDocument JSON beside it under the same stem
(``report.pdf`` + ``report.json``, possibly hand-corrected), or a directory, meaning every PDF / image in it
(not recursive) with its JSON. PDF pages are rendered with pypdfium2 at ``--scale`` (2.0 gives 1224x1584 px
for a US-letter page); images are copied as RGB PNGs. The answers are the JSON's DocTags, so the model learns
exactly what the JSON says, corrections included.

Written, with paths in ``img_pth`` relative to OUT::

    OUT/images/<split>/<stem>_<page>.png      page index from 0
    OUT/anns/<split>/<stem>_<page>.json       --unit page (default): one page, one turn
    OUT/anns/<split>/<stem>.json              --unit document: all pages, one turn

The prompt is "Convert this page to docling." (granite-docling's model card). With ``--unit page`` the answer
is that page's DocTags, ``<doctag>...</doctag>``, from ``export_to_doctags(pages={n}, add_page_index=False)``:
without ``add_page_index=False`` docling-core keeps one ``<page_break>`` per page transition of the whole
document in every single-page export. With ``--unit document`` the answer is the page answers' bodies joined by
``<page_break>`` inside one ``<doctag>``, the DoclingMatix form: one segment per image. That is byte-identical
to ``export_to_doctags()`` when every page has content; docling-core writes one break per transition between
pages that have items, so a document with an empty page would otherwise get fewer segments than images.

Usable from Python as ``prepare_dataset(inputs, out_dir, unit="page")``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from docling_core.types.doc import ContentLayer, DocItem, DoclingDocument
from PIL import Image

from granite_docling.data.answers import PAGE_PROMPT, document_doctags, page_doctags
from granite_docling.tools.pages import IMAGE_SUFFIXES, PAGE_SUFFIXES, is_page_file, is_pdf, page_files, render_pages
from granite_docling.user_error import UserError

logger = logging.getLogger(__name__)

UNITS = ("page", "document")
# Page aspect ratios (width / height) of the rendered input and of the JSON may differ by this much before we warn:
# <loc_N> tokens are normalised by the JSON's page size, so a different page shape puts every box off.
ASPECT_TOLERANCE = 0.02


class PrepareError(UserError, ValueError):
    """A problem with the user's inputs or output folder; the message says what to do."""


@dataclass(frozen=True)
class SourceDocument:
    """One input document: a PDF or a page image, and the DoclingDocument JSON that describes it."""

    path: Path
    json_path: Path

    @property
    def is_pdf(self) -> bool:
        return is_pdf(self.path)

    @property
    def sample_stem(self) -> str:
        # File names become sample ids; keep them portable.
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.path.stem)


def _collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[SourceDocument], list[str]]:
    """The usable (document, JSON) pairs, and a message for every input that is not usable."""
    problems: list[str] = []
    sources: list[SourceDocument] = []
    for raw in inputs:
        path = Path(raw)
        found: list[Path] = []
        if path.is_dir():
            found = page_files(path)
            if not found:
                problems.append(f"{path}: folder holds no PDF or page image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif not path.exists():
            problems.append(f"{path}: no such file or folder")
        elif path.suffix.lower() == ".json":
            problems.append(f"{path}: pass the PDF or page image, not its JSON; the JSON is found by its stem")
        elif not is_page_file(path):
            problems.append(f"{path}: not a PDF or page image ({', '.join(sorted(PAGE_SUFFIXES))})")
        else:
            found = [path]
        for page_source in found:
            json_path = page_source.with_suffix(".json")
            if json_path.is_file():
                sources.append(SourceDocument(page_source, json_path))
            else:
                problems.append(
                    f"{page_source}: missing DoclingDocument JSON {json_path}; convert the file with docling and "
                    "save `result.document.save_as_json(...)` (or `docling --to json`) under the same stem"
                )
    stems: dict[str, Path] = {}
    for source in sources:
        if source.sample_stem in stems:
            problems.append(
                f"{source.path} and {stems[source.sample_stem]} would both write samples named "
                f"{source.sample_stem!r}; rename one of them"
            )
        stems.setdefault(source.sample_stem, source.path)
    return sources, problems


def load_docling_document(json_path: Path) -> DoclingDocument:
    """Read a DoclingDocument JSON, turning parse / validation failures into an error that says what to do."""
    try:
        return DoclingDocument.load_from_json(json_path)
    except ValueError as error:  # pydantic's ValidationError and json's decode errors are ValueErrors
        raise PrepareError(
            f"{json_path}: not a DoclingDocument JSON ({_first_problem(error)}); give the JSON docling writes "
            "(`DoclingDocument.save_as_json`), not Markdown/DocTags or another tool's JSON"
        ) from error


def _first_problem(error: ValueError) -> str:
    """One line about what is wrong: pydantic's first error with its location, or the exception's message."""
    errors = getattr(error, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        return f"{where}: {first['msg']}"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def count_pages(source: SourceDocument) -> int:
    """Number of pages in the PDF, or 1 for a page image; a file that cannot be opened is a PrepareError."""
    if not source.is_pdf:
        try:
            with Image.open(source.path):
                return 1
        except OSError as error:  # PIL's UnidentifiedImageError is an OSError
            raise PrepareError(f"{source.path}: cannot read this image ({error})") from error
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(source.path)
    except pdfium.PdfiumError as error:
        raise PrepareError(f"{source.path}: cannot open this PDF ({error}); is it damaged or encrypted?") from error
    try:
        return len(pdf)
    finally:
        pdf.close()


def check_document(source: SourceDocument, doc: DoclingDocument) -> list[str]:
    """Every problem that makes this (input, JSON) pair unusable, as messages; empty when it is fine."""
    n_input_pages = count_pages(source)
    page_numbers = sorted(doc.pages)
    expected = list(range(1, n_input_pages + 1))
    if page_numbers == expected:
        return []
    kind = "PDF" if source.is_pdf else "page image"
    return [
        f"{source.path}: page count mismatch: the {kind} has {n_input_pages} page(s) but {source.json_path.name} "
        f"describes {len(page_numbers)} (page numbers {page_numbers[:10]}{'...' if len(page_numbers) > 10 else ''}); "
        "convert the whole file with docling again, or pair it with the JSON made from it"
    ]


def _warn_on_missing_provenance(source: SourceDocument, doc: DoclingDocument) -> None:
    # docling-core's page filter drops items without provenance, so they would silently vanish from page answers.
    layers = {ContentLayer.BODY, ContentLayer.FURNITURE}  # the layers export_to_doctags writes
    orphans = sum(
        1
        for item, _ in doc.iterate_items(included_content_layers=layers)
        if isinstance(item, DocItem) and not item.prov
    )
    if orphans:
        logger.warning(
            "%s: %d item(s) have no page provenance and are left out of the answers", source.json_path, orphans
        )


def _warn_on_page_shape(source: SourceDocument, doc: DoclingDocument, images: list[Image.Image]) -> None:
    for page_no, image in zip(sorted(doc.pages), images, strict=True):
        size = doc.pages[page_no].size
        json_aspect = size.width / size.height
        image_aspect = image.width / image.height
        if abs(json_aspect / image_aspect - 1) > ASPECT_TOLERANCE:
            logger.warning(
                "%s page %d: image is %dx%d px but the JSON page is %.0fx%.0f; boxes will not line up",
                source.path,
                page_no,
                image.width,
                image.height,
                size.width,
                size.height,
            )


def split_dirs(out_dir: Path, split: str) -> tuple[Path, Path]:
    """The annotation and image folders of one split."""
    return out_dir / "anns" / split, out_dir / "images" / split


def prepare_output_dirs(out_dir: Path, split: str, overwrite: bool) -> tuple[Path, Path]:
    """Create ``anns/<split>`` and ``images/<split>``; refuse to mix with an earlier run unless ``overwrite``.

    Only the two split folders are checked and, with ``overwrite``, emptied: another split in the same OUT
    (``--split val`` next to ``train``) is left alone.
    """
    anns_dir, images_dir = split_dirs(out_dir, split)
    occupied = [d for d in (anns_dir, images_dir) if d.is_dir() and any(d.iterdir())]
    if occupied and not overwrite:
        raise PrepareError(
            f"output folder is not empty: {', '.join(map(str, occupied))}; "
            "choose another --out / --split, or pass --overwrite to replace that split"
        )
    for directory in occupied:
        shutil.rmtree(directory)
    anns_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    return anns_dir, images_dir


def write_json(path: Path, record: dict) -> None:
    """Write one annotation file; fixed formatting so equal inputs give byte-identical files."""
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def page_records(stem: str, split: str, doc: DoclingDocument, source_name: str) -> list[tuple[str, dict]]:
    """``(sample id, annotation)`` for each page: one image, one conversion turn."""
    records = []
    for index, page_no in enumerate(sorted(doc.pages)):
        turn = {"user": PAGE_PROMPT, "assistant": page_doctags(doc, page_no), "source": f"{source_name}#page={page_no}"}
        records.append((f"{stem}_{index}", {"img_pth": f"images/{split}/{stem}_{index}.png", "anns": turn}))
    return records


def document_record(stem: str, split: str, doc: DoclingDocument, source_name: str) -> tuple[str, dict]:
    """``(sample id, annotation)`` for the whole document: every page image, one conversion turn."""
    images = [f"images/{split}/{stem}_{index}.png" for index in range(len(doc.pages))]
    turn = {"user": PAGE_PROMPT, "assistant": document_doctags(doc), "source": source_name}
    return stem, {"img_pth": images, "anns": [turn]}


def prepare_dataset(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    unit: str = "page",
    split: str = "train",
    scale: float = 2.0,
    overwrite: bool = False,
) -> dict:
    """Write a Docling-folder dataset from PDFs / page images and their DoclingDocument JSON.

    Every input is checked before anything is written, so a bad input leaves OUT untouched. Returns a summary:
    ``{"out_dir", "split", "unit", "documents", "pages", "samples"}``.
    """
    if unit not in UNITS:
        raise PrepareError(f"unit must be one of {UNITS}, got {unit!r}")
    if scale <= 0:
        raise PrepareError(f"scale must be positive, got {scale}")
    out_dir = Path(out_dir)
    sources, problems = _collect_inputs(inputs)
    for source in sources:
        try:
            problems += check_document(source, load_docling_document(source.json_path))
        except PrepareError as error:
            problems.append(str(error))
    if problems:
        raise PrepareError("cannot prepare these inputs:\n  " + "\n  ".join(problems))

    anns_dir, images_dir = prepare_output_dirs(out_dir, split, overwrite)
    n_pages = n_samples = 0
    for index, source in enumerate(sources, start=1):
        # Loaded again rather than kept from the check: a corpus of large documents need not fit in memory.
        doc = load_docling_document(source.json_path)
        images = render_pages(source.path, scale)
        _warn_on_page_shape(source, doc, images)
        _warn_on_missing_provenance(source, doc)
        stem = source.sample_stem
        for page_index, image in enumerate(images):
            image.save(images_dir / f"{stem}_{page_index}.png")
        if unit == "page":
            records = page_records(stem, split, doc, source.path.name)
        else:
            records = [document_record(stem, split, doc, source.path.name)]
        for sample_id, record in records:
            write_json(anns_dir / f"{sample_id}.json", record)
        n_pages += len(images)
        n_samples += len(records)
        logger.info(
            "[%d/%d] %s: %d page(s) -> %d sample(s)", index, len(sources), source.path, len(images), len(records)
        )
    return {
        "out_dir": str(out_dir),
        "split": split,
        "unit": unit,
        "documents": len(sources),
        "pages": n_pages,
        "samples": n_samples,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="PDF / page image with X.json beside it, or a folder"
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset root to write (anns/ and images/ go here)")
    parser.add_argument("--unit", choices=UNITS, default="page", help="one sample per page (default) or per document")
    parser.add_argument("--split", default="train", help="split name, the folder under anns/ and images/")
    parser.add_argument("--scale", type=float, default=2.0, help="PDF render scale, 1.0 = 72 dpi (default 2.0)")
    parser.add_argument("--overwrite", action="store_true", help="replace anns/<split> and images/<split> if present")


def run(args: argparse.Namespace) -> int:
    summary = prepare_dataset(args.inputs, args.out, args.unit, args.split, args.scale, args.overwrite)
    print(
        f"wrote {summary['samples']} sample(s) ({summary['pages']} page(s) from {summary['documents']} document(s), "
        f"unit={summary['unit']}) to {summary['out_dir']} (anns/{summary['split']}, images/{summary['split']})"
    )
    return 0
