"""Decode sample images safely: refuse paths outside the dataset, oversized images and truncated files.

Called in DataLoader workers; every failure is an :class:`ImageError` carrying a reason key of
``granite_docling.data.sample.REASONS``, so one bad file skips one sample instead of killing the run.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from granite_docling.data.sample import ImageRef

# 100 MP is a 600 dpi A3 page with room to spare; PIL's own bomb guard warns at 89 MP and fails at 179 MP.
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing any path that resolves outside ``root`` (``..``, absolute paths, symlinks)."""
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ImageError("path_outside_root", f"{relative} resolves to {path}, outside {root}")
    return path


def decode_image(ref: ImageRef, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from a path or encoded bytes; raises :class:`ImageError` with the reason on any failure."""
    if isinstance(ref, Path) and not ref.is_file():
        raise ImageError("missing_image", f"{ref} does not exist")
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP; our own limit below is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(ref if isinstance(ref, Path) else io.BytesIO(ref))
        with image:
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > max_pixels:
                raise ImageError("image_too_large", f"{width}x{height} is over {max_pixels:,} pixels")
            image.load()  # decodes fully: truncated files fail here, not later in the processor
            return image.convert("RGB")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError("unreadable_image", f"{_describe(ref)}: {error}") from error


def _describe(ref: ImageRef) -> str:
    return str(ref) if isinstance(ref, Path) else f"<{len(ref)} bytes>"
