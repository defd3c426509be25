"""DocTags <-> docling-core conversion helpers used by the evaluation metrics.

The model answers in DocTags. To score a page the way docling-eval does, both the prediction and the ground
truth go through docling-core: ``DocTagsDocument.from_doctags_and_image_pairs`` + ``DoclingDocument.load_from_doctags``
(docling-eval ``evaluators/base_evaluator.py::docling_document_from_doctags``), then Markdown for the text metrics,
``TableData`` for TEDS and provenance boxes for layout mAP. This module also checks the health of a generated
answer: where it stopped (eos), whether docling-core accepts it and whether every tag it opens is closed.

Usage::

    doc = doctags_to_document(answer)               # raises ValueError if docling-core rejects it
    markdown = document_markdown(doc)               # tables left out, as docling-eval's text evaluator does
    boxes = document_boxes(doc)                     # LabelledBox on the 0..500 <loc_N> grid, top-left origin
    html = otsl_to_html("<otsl><fcel>a<fcel>b<nl></otsl>")
    problems = tag_stream_errors(answer)            # [] when every opened tag is closed in order
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator, Sequence

from docling_core.types.doc.base import ImageRefMode
from docling_core.types.doc.document import (
    DEFAULT_EXPORT_LABELS,
    ContentLayer,
    DocItem,
    DoclingDocument,
    DocTagsDocument,
    TableData,
)
from docling_core.types.doc.labels import DocItemLabel, PictureClassificationLabel
from docling_core.types.doc.tokens import DocumentToken, TableToken
from docling_core.types.doc.utils import parse_otsl_table_content
from PIL import Image

from granite_docling.evaluation.layout import LOC_GRID, LabelledBox

_log = logging.getLogger(__name__)

EOS_TOKEN = "<|end_of_text|>"
"""The tokenizer's eos (== pad) as text; a raw decode keeps it where generation stopped by itself."""

PAGE_OPEN_TAG = f"<{DocumentToken.DOCUMENT.value}>"
"""A full-page conversion answer starts with this tag; any other answer is a short answer (formula, code, ...)."""

# docling-eval markdown_text_evaluator.py exports these labels: every text-like label, TABLE deliberately left out
# (tables are scored by TEDS instead of by the text metrics).
MARKDOWN_LABELS: frozenset[DocItemLabel] = frozenset(
    {
        DocItemLabel.CAPTION,
        DocItemLabel.FOOTNOTE,
        DocItemLabel.FORMULA,
        DocItemLabel.LIST_ITEM,
        DocItemLabel.PAGE_FOOTER,
        DocItemLabel.PAGE_HEADER,
        DocItemLabel.PICTURE,
        DocItemLabel.SECTION_HEADER,
        DocItemLabel.TEXT,
        DocItemLabel.TITLE,
        DocItemLabel.DOCUMENT_INDEX,
        DocItemLabel.CODE,
        DocItemLabel.CHECKBOX_SELECTED,
        DocItemLabel.CHECKBOX_UNSELECTED,
        DocItemLabel.FORM,
        DocItemLabel.KEY_VALUE_REGION,
        DocItemLabel.PARAGRAPH,
        DocItemLabel.REFERENCE,
    }
)

# Elements that must be closed. DocumentToken lists docling-core's element tags; page_break is a marker, and
# "table" is only ever a picture-classification marker in DocTags (tables are <otsl>).
_PAIRED_TAGS: frozenset[str] = frozenset(
    {t.value for t in DocumentToken if t not in (DocumentToken.PAGE_BREAK, DocumentToken.TABLE)}
    | {f"section_header_level_{level}" for level in range(1, 7)}
    | {"paragraph", "references"}
)
# Markers that never take a closing tag: OTSL cell tokens, page breaks and picture-classification labels
# (docling-core load_from_doctags also accepts the SmolDocling legacy names below).
_SELF_CLOSING_TAGS: frozenset[str] = frozenset(
    {t.value.strip("<>") for t in TableToken}
    | {DocumentToken.PAGE_BREAK.value}
    | ({label.value for label in PictureClassificationLabel} - _PAIRED_TAGS)
    | {"line", "dot_line", "vbar_categorical", "hbar_categorical"}
)
# <loc_N> coordinates, <link_N> key-value links, <_Python_> code-language markers.
_SELF_CLOSING_PATTERN = re.compile(r"loc_\d+|link_\d+|_[^<>]*_")
# Keyed key/value cells (<key_3>...</key_3>) are elements too.
_PAIRED_PATTERN = re.compile(r"(?:key|value)_\d+")
# A tag name starts with a letter or "_" and has no blanks, so "P < 0.05 > Q" in running text is not a tag.
_TAG = re.compile(r"<(/?)([A-Za-z_][^<>\s/]*)>")


def split_at_eos(generated: str) -> tuple[str, bool]:
    """Cut a raw decoded generation at its first eos; return (answer, stopped_with_eos).

    pad == eos in this tokenizer, so anything after the first eos is padding, never answer text.
    """
    answer, found, _ = generated.partition(EOS_TOKEN)
    return answer, bool(found)


def is_page_answer(answer: str) -> bool:
    """True for a full-page conversion answer (it opens with ``<doctag>``)."""
    return answer.lstrip().startswith(PAGE_OPEN_TAG)


def contains_doctags(text: str) -> bool:
    """True when the text uses DocTags markup (an element tag, an OTSL token or a location)."""
    return any(_is_known_tag(name) for _, name in _iter_tags(text))


def doctags_to_document(doctags: str, page_image: Image.Image | None = None, name: str = "page") -> DoclingDocument:
    """Parse one page of DocTags into a DoclingDocument; ValueError when docling-core rejects it.

    Without an image docling-core makes a 1x1 page, so provenance boxes come out in page fractions.
    """
    pages = DocTagsDocument.from_doctags_and_image_pairs([doctags], [page_image])
    try:
        return DoclingDocument.load_from_doctags(pages, document_name=name)
    except Exception as error:  # docling-core raises assorted types on malformed input
        raise ValueError(f"docling-core could not parse the DocTags: {type(error).__name__}: {error}") from error


def try_doctags_to_document(
    doctags: str, page_image: Image.Image | None = None, name: str = "page"
) -> DoclingDocument | None:
    """Like doctags_to_document, but None (and a debug log line) instead of an error: for model predictions."""
    try:
        return doctags_to_document(doctags, page_image, name)
    except ValueError as error:
        _log.debug("prediction rejected by docling-core: %s", error)
        return None


def document_markdown(doc: DoclingDocument) -> str:
    """Markdown of the page as docling-eval's MarkdownTextEvaluator exports it: tables and image placeholders out,
    body and furniture (page headers / footers) in."""
    return doc.export_to_markdown(
        image_mode=ImageRefMode.PLACEHOLDER,
        image_placeholder="",
        labels=set(MARKDOWN_LABELS),
        included_content_layers={ContentLayer.BODY, ContentLayer.FURNITURE},
    )


def document_tables(doc: DoclingDocument) -> list[TableData]:
    """The page's tables in reading order; docling-eval's TableEvaluator skips non-TABLE labels the same way."""
    return [table.data for table in doc.tables if table.label == DocItemLabel.TABLE]


def document_boxes(doc: DoclingDocument) -> list[LabelledBox]:
    """Every provenance box of the layout labels docling-eval scores, on the 0..500 grid with top-left origin.

    Follows docling-eval LayoutEvaluator._collect_items_by_page / _extract_page_data: all content layers except
    BACKGROUND, pictures traversed, labels restricted to docling-core's DEFAULT_EXPORT_LABELS (so captions and
    footnotes are not part of mAP), each box normalised by its page size (there scaled to 100, here to 500).
    """
    layers = {layer for layer in ContentLayer if layer != ContentLayer.BACKGROUND}
    boxes = []
    for item, _level in doc.iterate_items(included_content_layers=layers, traverse_pictures=True, with_groups=True):
        if not isinstance(item, DocItem) or item.label not in DEFAULT_EXPORT_LABELS:
            continue
        for prov in item.prov:
            size = doc.pages[prov.page_no].size
            box = prov.bbox.to_top_left_origin(page_height=size.height).normalized(size).scaled(LOC_GRID)
            # Round away the float noise of loc/500*500 so boxes land back on the integer grid.
            coords = (round(box.l, 6), round(box.t, 6), round(box.r, 6), round(box.b, 6))
            boxes.append(LabelledBox(str(item.label.value), *coords))
    return boxes


def otsl_to_table(otsl: str) -> TableData:
    """Parse an OTSL table (``<otsl>...<fcel>a<ecel><nl>...</otsl>``, locations and caption allowed) into TableData."""
    return parse_otsl_table_content(otsl)


def table_to_html(table: TableData) -> str:
    """HTML for a table grid: ``<table><tr><td colspan=.. rowspan=..>text</td>..</tr>..</table>``.

    No ``<tbody>`` and no caption: this is the form TEDS is defined on here (see teds.py), so the HTML and the
    TableData routes give the same score. A spanned cell is written once, in the row and column where it starts.
    """
    rows = []
    for row in range(table.num_rows):
        cells = sorted(
            (cell for cell in table.table_cells if cell.start_row_offset_idx == row),
            key=lambda cell: cell.start_col_offset_idx,
        )
        rows.append("<tr>" + "".join(_cell_html(cell.text, cell.col_span, cell.row_span) for cell in cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def otsl_to_html(otsl: str) -> str:
    """HTML for an OTSL table string; see table_to_html."""
    return table_to_html(otsl_to_table(otsl))


def tag_stream_errors(doctags: str, opened: Sequence[str] = ()) -> list[str]:
    """Problems in the DocTags tag stream: closing tags that close nothing or the wrong element, unclosed elements.

    Self-closing markers (``<loc_N>``, OTSL cells, ``<nl>``, ``<page_break>``, picture classes, code languages) are
    skipped; every other opened tag must be closed, innermost first. ``opened``: elements already open when the
    text starts, outermost first (opened by the prompt: see opened_by_prompt). An empty list means well-formed.
    """
    errors: list[str] = []
    open_tags: list[str] = list(opened)
    for closing, name in _iter_tags(doctags):
        if _is_self_closing(name):
            if closing:
                errors.append(f"closing tag </{name}> for a self-closing marker")
            continue
        if not closing:
            open_tags.append(name)
        elif open_tags and open_tags[-1] == name:
            open_tags.pop()
        elif name in open_tags:
            # Recover by closing the elements left open inside it, so one slip is reported once.
            while open_tags[-1] != name:
                errors.append(f"<{open_tags.pop()}> not closed before </{name}>")
            open_tags.pop()
        else:
            errors.append(f"</{name}> closes nothing")
    errors.extend(f"<{name}> never closed" for name in reversed(open_tags))
    return errors


def is_well_formed(doctags: str, opened: Sequence[str] = ()) -> bool:
    """True when every opened tag is closed, in order (see tag_stream_errors)."""
    return not tag_stream_errors(doctags, opened)


def opened_by_prompt(answer: str) -> list[str]:
    """The elements an answer closes without opening them, outermost first: the prompt opened them, as
    SynthFormulaNet's user turn ``<formula>`` opens the element its answer (``<loc_..>...LATEX</formula>``) closes."""
    open_tags: list[str] = []
    unopened: list[str] = []
    for closing, name in _iter_tags(answer):
        if _is_self_closing(name):
            continue
        if not closing:
            open_tags.append(name)
        elif name in open_tags:
            while open_tags.pop() != name:  # closes it and whatever was left open inside it
                pass
        else:
            unopened.append(name)  # innermost first
    return unopened[::-1]


def _iter_tags(text: str) -> Iterator[tuple[bool, str]]:
    for match in _TAG.finditer(text):
        yield match.group(1) == "/", match.group(2)


def _is_self_closing(name: str) -> bool:
    return name in _SELF_CLOSING_TAGS or _SELF_CLOSING_PATTERN.fullmatch(name) is not None


def _is_known_tag(name: str) -> bool:
    return name in _PAIRED_TAGS or _PAIRED_PATTERN.fullmatch(name) is not None or _is_self_closing(name)


def _cell_html(text: str, col_span: int, row_span: int) -> str:
    spans = (f' colspan="{col_span}"' if col_span > 1 else "") + (f' rowspan="{row_span}"' if row_span > 1 else "")
    return f"<td{spans}>{html.escape(text, quote=False)}</td>"
