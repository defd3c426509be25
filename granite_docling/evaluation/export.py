"""Model answers (DocTags) -> docling-core documents -> Markdown, HTML and JSON files, page by page.

A page conversion answer is one ``<doctag>...</doctag>``; a multi-image sample answers all its pages in one
``<doctag>`` with ``<page_break>`` between them (the DoclingMatix layout). :func:`split_pages` cuts such an answer
into one DocTags string per page, :func:`pages_to_document` turns the pages and their images into one
``DoclingDocument`` (the images size the pages and give pictures their crops), and :func:`write_document_files`
writes what ``granite-docling predict`` and ``evaluate.py`` leave for people to read::

    doc = pages_to_document(split_pages(answer), page_images, name="invoice")
    write_document_files(Path("out/invoice"), "invoice", split_pages(answer), doc)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from docling_core.types.doc.base import ImageRefMode
from docling_core.types.doc.document import DoclingDocument, DocTagsDocument
from docling_core.types.doc.tokens import DocumentToken
from PIL import Image

log = logging.getLogger(__name__)

PAGE_BREAK = f"<{DocumentToken.PAGE_BREAK.value}>"
DOC_OPEN = f"<{DocumentToken.DOCUMENT.value}>"
DOC_CLOSE = f"</{DocumentToken.DOCUMENT.value}>"


def split_pages(doctags: str) -> list[str]:
    """One ``<doctag>...</doctag>`` string per page of a (possibly multi-page) DocTags answer."""
    body = doctags.strip()
    body = body.removeprefix(DOC_OPEN).removesuffix(DOC_CLOSE)
    return [f"{DOC_OPEN}{page.strip()}{DOC_CLOSE}" for page in body.split(PAGE_BREAK)]


def pages_to_document(
    pages: Sequence[str], images: Sequence[Image.Image | None] | None = None, name: str = "document"
) -> DoclingDocument:
    """A DoclingDocument from per-page DocTags; ``images[i]`` (if given) is page i's picture.

    docling-core recovers what it can from malformed DocTags; anything it cannot handle at all raises ValueError.
    """
    page_images = list(images) if images is not None else [None] * len(pages)
    if len(page_images) != len(pages):
        # A model may write more or fewer <page_break> than there are images: pair what pairs.
        page_images = (page_images + [None] * len(pages))[: len(pages)]
    try:
        pairs = DocTagsDocument.from_doctags_and_image_pairs(list(pages), page_images)
        return DoclingDocument.load_from_doctags(pairs, document_name=name)
    except Exception as error:  # docling-core raises assorted types on malformed input
        raise ValueError(f"docling-core could not build a document: {type(error).__name__}: {error}") from error


def document_doctags(doc: DoclingDocument, pages: Sequence[str]) -> str:
    """The whole document as DocTags: docling-core's export, or the pages joined when the export fails."""
    try:
        return doc.export_to_doctags()
    except Exception as error:  # a known TypeError in docling-core 2.102-2.104 on documents with captions
        log.debug("export_to_doctags failed (%s); joining the page answers instead", error)
        inner = [page.removeprefix(DOC_OPEN).removesuffix(DOC_CLOSE) for page in pages]
        return DOC_OPEN + PAGE_BREAK.join(inner) + DOC_CLOSE


def write_document_files(folder: Path, stem: str, pages: Sequence[str], doc: DoclingDocument | None) -> list[Path]:
    """Write ``page_NNN.doctags`` for every page and, when ``doc`` is given, ``page_NNN.md`` / ``page_NNN.html``
    plus ``<stem>.md``, ``<stem>.html``, ``<stem>.doctags`` and ``<stem>.json`` for the whole document.

    Returns the files written. Pictures are embedded in the HTML and JSON, so each file stands alone.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name: str, text: str) -> None:
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)

    for number, page in enumerate(pages, start=1):
        write(f"page_{number:03d}.doctags", page)
        if doc is not None:
            write(f"page_{number:03d}.md", doc.export_to_markdown(page_no=number))
            write(f"page_{number:03d}.html", doc.export_to_html(page_no=number, image_mode=ImageRefMode.EMBEDDED))
    if doc is not None:
        write(f"{stem}.md", doc.export_to_markdown())
        write(f"{stem}.html", doc.export_to_html(image_mode=ImageRefMode.EMBEDDED))
        write(f"{stem}.doctags", document_doctags(doc, pages))
        doc.save_as_json(folder / f"{stem}.json")
        written.append(folder / f"{stem}.json")
    return written


def export_answer(
    folder: Path, stem: str, answer: str, images: Sequence[Image.Image | None] | None = None
) -> list[Path]:
    """Split ``answer`` into pages, build the document and write its files (DocTags only if docling-core fails)."""
    pages = split_pages(answer)
    try:
        doc = pages_to_document(pages, images, name=stem)
    except ValueError as error:
        log.warning("%s: %s; writing the DocTags only", stem, error)
        doc = None
    return write_document_files(folder, stem, pages, doc)
