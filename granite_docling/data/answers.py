"""A DoclingDocument's DocTags, the answers granite-docling learns: per page, or per document.

The prompt is the model card's. One page's answer is ``<doctag>...</doctag>`` from
``export_to_doctags(pages={n}, add_page_index=False)``: without ``add_page_index=False`` docling-core keeps one
``<page_break>`` per page transition of the whole document in every single-page export. A document's answer is
the page answers' bodies joined by ``<page_break>`` inside one ``<doctag>`` (DoclingMatix's form: one segment
per image), byte-identical to ``export_to_doctags()`` when every page has content; docling-core writes one break
per transition between pages that have items, so a document with an empty page would otherwise get fewer
segments than images.
"""

from __future__ import annotations

from docling_core.types.doc import DoclingDocument

PAGE_PROMPT = "Convert this page to docling."
DOCTAG_OPEN = "<doctag>"
DOCTAG_CLOSE = "</doctag>"
PAGE_BREAK = "<page_break>"


def page_doctags(doc: DoclingDocument, page_no: int) -> str:
    """The DocTags of one page, ``<doctag>...</doctag>``, with no ``<page_break>`` markers for the other pages."""
    text = doc.export_to_doctags(pages={page_no}, add_page_index=False)
    body = text.removeprefix(DOCTAG_OPEN).removesuffix(DOCTAG_CLOSE)
    # An empty page serialises as a lone delimiter; the answer for a blank page is an empty <doctag>.
    return DOCTAG_OPEN + (body if body.strip() else "") + DOCTAG_CLOSE


def document_doctags(doc: DoclingDocument, pages: list[int] | None = None) -> str:
    """``pages`` (default: all, in order) in one ``<doctag>``, one ``<page_break>``-separated segment per page."""
    bodies = [
        page_doctags(doc, page_no).removeprefix(DOCTAG_OPEN).removesuffix(DOCTAG_CLOSE)
        for page_no in (sorted(doc.pages) if pages is None else pages)
    ]
    return DOCTAG_OPEN + f"{PAGE_BREAK}\n".join(bodies) + DOCTAG_CLOSE
