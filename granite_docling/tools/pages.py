"""Documents given as files: PDFs and page images, found in folders and rendered to RGB pages.

    render_pages(Path("paper.pdf"), scale=2.0)     # one PIL image per page, 144 dpi

What ``granite-docling prepare`` (PDF + DoclingDocument JSON -> dataset) and ``granite-docling predict``
(PDF -> DocTags, Markdown, HTML) both read.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from granite_docling.user_error import UserError

PDF_SUFFIXES = frozenset({".pdf"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"})
PAGE_SUFFIXES = PDF_SUFFIXES | IMAGE_SUFFIXES


class PageFileError(UserError, ValueError):
    """An input that is no PDF or page image, or no file at all; the message says which."""


def is_pdf(path: Path) -> bool:
    return path.suffix.lower() in PDF_SUFFIXES


def is_page_file(path: Path) -> bool:
    """A PDF or a page image (by its suffix) that exists."""
    return path.is_file() and path.suffix.lower() in PAGE_SUFFIXES


def page_files(folder: Path) -> list[Path]:
    """The PDFs and page images directly inside ``folder``, sorted."""
    return sorted(path for path in folder.iterdir() if is_page_file(path))


def render_pages(path: Path, scale: float = 2.0) -> list[Image.Image]:
    """Every page of a PDF as an RGB image (pypdfium2 at ``scale``, 1.0 = 72 dpi), or the image file as one page."""
    if not is_pdf(path):
        with Image.open(path) as image:
            return [image.convert("RGB")]
    import pypdfium2

    pdf = pypdfium2.PdfDocument(path)
    try:
        return [pdf[i].render(scale=scale).to_pil().convert("RGB") for i in range(len(pdf))]
    finally:
        pdf.close()
