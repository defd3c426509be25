"""Synthetic document pages: blocks laid out on US-letter pages as annotated items (what the answer says, with
boxes in points), drawn with PIL exactly where the boxes say, and turned into a ``DoclingDocument``."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

from docling_core.types.doc import (
    BoundingBox,
    CoordOrigin,
    DocItemLabel,
    DoclingDocument,
    ProvenanceItem,
    Size,
    TableCell,
    TableData,
)
from docling_core.types.doc.labels import CodeLanguageLabel
from PIL import Image, ImageDraw, ImageFont

from granite_docling.tools.synth_text import (
    MATH_FONTSETS,
    SECTION_NAMES,
    WORDS,
    code_snippet,
    paragraph,
    phrase,
    random_latex,
    render_latex,
    sentence,
)

PAGE_WIDTH = 612.0
PAGE_HEIGHT = 792.0  # US letter in PDF points (1/72 inch)
INK = (0, 0, 0)
GREY = (90, 90, 90)
HEADER_BLUE = (25, 55, 110)
CODE_BG = (242, 242, 242)


# ---------------------------------------------------------------- rendering primitives


@functools.lru_cache(maxsize=64)
def font(name: str, size_px: int) -> ImageFont.FreeTypeFont:
    """A DejaVu font bundled with matplotlib, so every machine draws the same glyphs."""
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size_px)


# ---------------------------------------------------------------- page layout: items (what the answer says) and ops


@dataclass
class Item:
    """One annotated element, box ``(l, t, r, b)`` in points from the page's top-left."""

    label: DocItemLabel
    bbox: tuple[float, float, float, float]
    text: str = ""
    level: int = 1  # section headers
    list_id: int | None = None  # consecutive list items with the same id form one list
    enumerated: bool = False
    language: CodeLanguageLabel | None = None
    table: TableData | None = None


@dataclass
class Page:
    """What one page holds: annotated items, and drawing ops ``(kind, *args)`` in points for the renderer."""

    items: list[Item] = field(default_factory=list)
    ops: list[tuple] = field(default_factory=list)


@dataclass
class Layout:
    """Per-document style and the running state of the flow layout (in points)."""

    rng: random.Random
    scale: float
    margin: float
    body_font: str
    body_size: float
    list_counter: int = 0
    section: int = 0

    @property
    def width(self) -> float:
        return PAGE_WIDTH - 2 * self.margin

    def measure(self, name: str, size_pt: float, text: str) -> float:
        return font(name, round(size_pt * self.scale)).getlength(text) / self.scale

    def line_height(self, name: str, size_pt: float) -> float:
        ascent, descent = font(name, round(size_pt * self.scale)).getmetrics()
        return (ascent + descent) / self.scale

    def wrap(self, name: str, size_pt: float, text: str, width: float) -> list[str]:
        lines: list[str] = []
        for word in text.split():
            if lines and self.measure(name, size_pt, f"{lines[-1]} {word}") <= width:
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word)
        return lines


def text_block(
    layout: Layout, page: Page, text: str, x: float, y: float, width: float, style: tuple, align: str = "left"
) -> tuple[float, float, float, float]:
    """Wrap ``text`` into ``width`` at (x, y), queue the draw ops, return the tight box of the drawn lines.

    8 parameters: the page being drawn (layout, page), the text and its box and style, as each page template
    places its blocks.
    """
    name, size, colour = style
    lines = layout.wrap(name, size, text, width)
    height = layout.line_height(name, size)
    leading = height * 1.18
    widths = [layout.measure(name, size, line) for line in lines]
    left = x if align == "left" else x + (width - max(widths)) / 2
    for i, (line, line_width) in enumerate(zip(lines, widths, strict=True)):
        line_x = x if align == "left" else x + (width - line_width) / 2
        page.ops.append(("text", line_x, y + i * leading, line, name, size, colour))
    return left, y, left + max(widths), y + (len(lines) - 1) * leading + height


def add_title(layout: Layout, page: Page, y: float) -> float:
    size = layout.rng.choice([16.0, 18.0, 20.0])
    text = phrase(layout.rng, layout.rng.randint(3, 8))
    box = text_block(layout, page, text, layout.margin, y, layout.width, ("DejaVuSans-Bold.ttf", size, INK), "center")
    page.items.append(Item(DocItemLabel.TITLE, box, text))
    return box[3]


def add_heading(layout: Layout, page: Page, y: float) -> float:
    rng = layout.rng
    if layout.section == 0 or rng.random() < 0.6:
        layout.section = layout.section + 1
        level = 1
        size = 12.5
        text = f"{layout.section} {rng.choice(SECTION_NAMES) if rng.random() < 0.5 else phrase(rng, rng.randint(2, 5))}"
    else:
        level = 2
        size = 10.5
        text = f"{layout.section}.{rng.randint(1, 4)} {phrase(rng, rng.randint(2, 5))}"
    box = text_block(layout, page, text, layout.margin, y, layout.width, ("DejaVuSans-Bold.ttf", size, HEADER_BLUE))
    page.items.append(Item(DocItemLabel.SECTION_HEADER, box, text, level=level))
    return box[3]


def add_paragraph(layout: Layout, page: Page, y: float) -> float:
    text = paragraph(layout.rng, layout.rng.randint(2, 6))
    box = text_block(layout, page, text, layout.margin, y, layout.width, (layout.body_font, layout.body_size, INK))
    page.items.append(Item(DocItemLabel.TEXT, box, text))
    return box[3]


def add_list(layout: Layout, page: Page, y: float) -> float:
    rng = layout.rng
    style = (layout.body_font, layout.body_size, INK)
    enumerated = rng.random() < 0.4
    indent = layout.margin + 16
    layout.list_counter += 1
    for number in range(1, rng.randint(2, 5) + 1):
        marker = f"{number}." if enumerated else "\u2022"
        text = sentence(rng) if rng.random() < 0.6 else paragraph(rng, 2)
        page.ops.append(("text", indent, y, marker, *style))
        text_x = indent + 14
        width = layout.width - (text_x - layout.margin)
        _, top, right, bottom = text_block(layout, page, text, text_x, y, width, style)
        # Like docling's layout boxes, the item's box starts at its marker; the text excludes the marker.
        box = (indent, top, right, bottom)
        page.items.append(Item(DocItemLabel.LIST_ITEM, box, text, list_id=layout.list_counter, enumerated=enumerated))
        y = bottom + 3
    return y - 3


def _cell(text: str, row: int, col: int, col_span: int = 1, header: bool = False) -> TableCell:
    return TableCell(
        text=text,
        col_span=col_span,
        start_row_offset_idx=row,
        end_row_offset_idx=row + 1,
        start_col_offset_idx=col,
        end_col_offset_idx=col + col_span,
        column_header=header,
    )


def _table_cells(rng: random.Random) -> tuple[list[TableCell], int, int]:
    """Header row(s), a label column and numeric cells; sometimes a group header spanning the value columns."""
    n_cols = rng.randint(2, 5)
    n_body = rng.randint(2, 6)
    cells = []
    header_row = 0
    if n_cols >= 3 and rng.random() < 0.3:
        cells += [_cell("", 0, 0, header=True), _cell(phrase(rng, 2), 0, 1, col_span=n_cols - 1, header=True)]
        header_row = 1
    cells += [_cell(phrase(rng, 1), header_row, col, header=True) for col in range(n_cols)]
    for row, label in enumerate(rng.sample(WORDS, n_body), start=header_row + 1):  # distinct row labels
        cells.append(_cell(label.capitalize(), row, 0))
        for col in range(1, n_cols):
            value = rng.choice([f"{rng.uniform(0, 100):.1f}", f"{rng.uniform(0, 1):.3f}", f"{rng.randint(10, 9999):,}"])
            cells.append(_cell(value, row, col))
    return cells, header_row + 1 + n_body, n_cols


def add_table(layout: Layout, page: Page, y: float) -> float | None:
    rng = layout.rng
    size = layout.body_size - 1
    pad = 4.0
    cells, n_rows, n_cols = _table_cells(rng)
    plain = "DejaVuSans.ttf"
    bold = "DejaVuSans-Bold.ttf"
    widths = [0.0] * n_cols
    for cell in cells:
        if cell.col_span == 1:
            text_width = layout.measure(bold if cell.column_header else plain, size, cell.text)
            widths[cell.start_col_offset_idx] = max(widths[cell.start_col_offset_idx], text_width)
    widths = [w + 2 * pad for w in widths]
    for cell in cells:  # a group header wider than the columns it spans widens the last of them
        spanned = widths[cell.start_col_offset_idx : cell.end_col_offset_idx]
        widths[cell.end_col_offset_idx - 1] += max(0.0, layout.measure(bold, size, cell.text) + 2 * pad - sum(spanned))
    if sum(widths) > layout.width:
        return None  # too wide for this page style: the caller tries another block
    if rng.random() < 0.5:  # half the tables span the text width
        widths = [w + (layout.width - sum(widths)) / n_cols for w in widths]
    x0 = layout.margin + (layout.width - sum(widths)) / 2
    col_x = [x0 + sum(widths[:i]) for i in range(n_cols + 1)]
    row_h = layout.line_height(plain, size) + 2 * pad
    row_y = [y + i * row_h for i in range(n_rows + 1)]
    grid = rng.random() < 0.5
    for cell in cells:
        left = col_x[cell.start_col_offset_idx]
        right = col_x[cell.end_col_offset_idx]
        top = row_y[cell.start_row_offset_idx]
        bottom = row_y[cell.end_row_offset_idx]
        cell.bbox = BoundingBox(l=left, t=top, r=right, b=bottom, coord_origin=CoordOrigin.TOPLEFT)
        if grid:
            page.ops.append(("rect", left, top, right, bottom, GREY, None))
        name = bold if cell.column_header else plain
        text_x = left + pad if cell.col_span == 1 else (left + right - layout.measure(name, size, cell.text)) / 2
        page.ops.append(("text", text_x, top + pad, cell.text, name, size, INK))
    if not grid:  # booktabs-style rules: top, under the header rows, bottom
        header_rows = 1 + max(c.start_row_offset_idx for c in cells if c.column_header)
        for rule_y in (row_y[0], row_y[header_rows], row_y[-1]):
            page.ops.append(("line", col_x[0], rule_y, col_x[-1], rule_y, INK))
    table = TableData(num_rows=n_rows, num_cols=n_cols, table_cells=cells)
    page.items.append(Item(DocItemLabel.TABLE, (col_x[0], row_y[0], col_x[-1], row_y[-1]), table=table))
    return row_y[-1]


def add_formula(layout: Layout, page: Page, y: float) -> float | None:
    rng = layout.rng
    for _ in range(5):  # a formula wider than the text column is redrawn, not squeezed
        latex = random_latex(rng)
        ink = render_latex(latex, layout.body_size + 2, 72 * layout.scale, rng.choice(MATH_FONTSETS))
        width = ink.shape[1] / layout.scale
        height = ink.shape[0] / layout.scale
        if width <= layout.width:
            x = layout.margin + (layout.width - width) / 2
            page.ops.append(("ink", x, y + 2, ink))
            page.items.append(Item(DocItemLabel.FORMULA, (x, y + 2, x + width, y + 2 + height), latex))
            return y + 4 + height
    return None


def add_code(layout: Layout, page: Page, y: float) -> float | None:
    language, code = code_snippet(layout.rng)
    name = "DejaVuSansMono.ttf"
    size = layout.body_size - 1.5
    height = layout.line_height(name, size)
    leading = layout.line_height(name, size) * 1.15
    lines = code.split("\n")
    right = layout.margin + 8 + max(layout.measure(name, size, line) for line in lines)
    if right > layout.margin + layout.width:
        return None
    bottom = y + 4 + (len(lines) - 1) * leading + height
    page.ops.append(("rect", layout.margin, y, layout.margin + layout.width, bottom + 4, None, CODE_BG))
    for i, line in enumerate(lines):
        page.ops.append(("text", layout.margin + 8, y + 4 + i * leading, line, name, size, INK))
    page.items.append(Item(DocItemLabel.CODE, (layout.margin + 8, y + 4, right, bottom), code, language=language))
    return bottom + 4


BLOCKS = ((add_paragraph, 40), (add_heading, 14), (add_list, 12), (add_table, 12), (add_formula, 10), (add_code, 8))


def layout_page(layout: Layout, page_no: int, running_title: str) -> Page:
    """Fill one page top to bottom with blocks; the first page opens with the title."""
    rng = layout.rng
    page = Page()
    top = layout.margin * 0.9
    bottom = PAGE_HEIGHT - layout.margin * 0.9
    if page_no > 1 and rng.random() < 0.7:
        style = ("DejaVuSans.ttf", 8.0, GREY)
        box = text_block(layout, page, running_title, layout.margin, top - 24, layout.width, style)
        page.items.append(Item(DocItemLabel.PAGE_HEADER, box, running_title))
    y = add_title(layout, page, top) + 14 if page_no == 1 else top
    failures = 0
    while failures < 4:
        # Blocks are laid out on a draft and kept only if they fit; numbering state is restored otherwise.
        draft = Page(list(page.items), list(page.ops))
        counters = (layout.section, layout.list_counter)
        add_block = rng.choices([b for b, _ in BLOCKS], weights=[w for _, w in BLOCKS])[0]
        end = add_block(layout, draft, y)
        if end is None or end > bottom:
            failures += 1
            layout.section, layout.list_counter = counters
            continue
        page = draft
        y = end + rng.uniform(7, 12)
    if rng.random() < 0.8:
        style = ("DejaVuSans.ttf", 9.0, INK)
        box = text_block(layout, page, str(page_no), layout.margin, PAGE_HEIGHT - 40, layout.width, style, "center")
        page.items.append(Item(DocItemLabel.PAGE_FOOTER, box, str(page_no)))
    return page


def render_page(page: Page, scale: float) -> Image.Image:
    """Draw the page's ops on a white RGB canvas of the page size times ``scale``."""
    image = Image.new("RGB", (round(PAGE_WIDTH * scale), round(PAGE_HEIGHT * scale)), "white")
    draw = ImageDraw.Draw(image)
    for kind, *args in page.ops:
        if kind == "text":
            x, y, text, name, size, colour = args
            draw.text((x * scale, y * scale), text, font=font(name, round(size * scale)), fill=colour, anchor="la")
        elif kind == "rect":
            *box, outline, fill = args
            draw.rectangle([v * scale for v in box], outline=outline, fill=fill)
        elif kind == "line":
            x0, y0, x1, y1, colour = args
            draw.line([x0 * scale, y0 * scale, x1 * scale, y1 * scale], fill=colour, width=max(1, round(scale)))
        elif kind == "ink":
            x, y, ink = args
            image.paste(INK, (round(x * scale), round(y * scale)), Image.fromarray(ink))
    return image


# ---------------------------------------------------------------- the document


def build_document(name: str, pages: list[Page]) -> DoclingDocument:
    """The DoclingDocument of the laid-out pages, with provenance in docling's bottom-left page coordinates."""
    doc = DoclingDocument(name=name)
    for page_no, page in enumerate(pages, start=1):
        doc.add_page(page_no=page_no, size=Size(width=PAGE_WIDTH, height=PAGE_HEIGHT))
        groups: dict[int, object] = {}
        for item in page.items:
            left, top, right, bottom = (round(v, 2) for v in item.bbox)
            box = BoundingBox(l=left, t=top, r=right, b=bottom, coord_origin=CoordOrigin.TOPLEFT)
            prov = ProvenanceItem(
                page_no=page_no, bbox=box.to_bottom_left_origin(PAGE_HEIGHT), charspan=(0, len(item.text))
            )
            if item.label == DocItemLabel.TITLE:
                doc.add_title(item.text, prov=prov)
            elif item.label == DocItemLabel.SECTION_HEADER:
                doc.add_heading(item.text, level=item.level, prov=prov)
            elif item.label == DocItemLabel.LIST_ITEM:
                if item.list_id not in groups:
                    groups[item.list_id] = doc.add_list_group()
                doc.add_list_item(item.text, enumerated=item.enumerated, parent=groups[item.list_id], prov=prov)
            elif item.label == DocItemLabel.TABLE:
                doc.add_table(data=item.table, prov=prov)
            elif item.label == DocItemLabel.FORMULA:
                doc.add_formula(item.text, prov=prov)
            elif item.label == DocItemLabel.CODE:
                doc.add_code(item.text, code_language=item.language, prov=prov)
            else:  # text, page header, page footer
                doc.add_text(item.label, item.text, prov=prov)
    return doc
