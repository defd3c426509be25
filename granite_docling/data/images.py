"""Decode sample images safely: refuse paths outside the dataset, bad paths, oversized images and damaged files.

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

# Formats PIL decodes by running another program (EPS: Ghostscript, a PostScript interpreter): never on a
# dataset's files, which may come from anyone.
EXTERNAL_DECODERS = frozenset({"EPS"})


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing any path that resolves outside ``root`` (``..``, absolute paths, symlinks),
    and any path the file system cannot resolve (a NUL byte, a symlink loop) as ``bad_image_path``."""
    root = root.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: pathlib's "Symlink loop from ..."
        raise ImageError("bad_image_path", f"{_shown(relative)}: {error}") from error
    if not path.is_relative_to(root):
        raise ImageError("path_outside_root", f"{_shown(relative)} resolves to {_shown(str(path))}, outside {root}")
    return path


def check_file(path: Path, shown: str) -> None:
    """Raise ``missing_image`` when nothing is at ``path``, ``bad_image_path`` when it is no file to open (a
    folder, a name too long, a symlink loop); ``shown`` names it in the message."""
    try:
        path.stat()
    except FileNotFoundError as error:
        raise ImageError("missing_image", f"{_shown(shown)} does not exist") from error
    except (OSError, ValueError) as error:  # ENAMETOOLONG, ELOOP, ENOTDIR, a NUL byte
        raise ImageError("bad_image_path", f"{_shown(shown)}: {error.strerror or error}") from error
    if not path.is_file():
        raise ImageError("bad_image_path", f"{_shown(shown)} is not a file")


def decode_image(ref: ImageRef, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from a path or encoded bytes; raises :class:`ImageError` with the reason on any failure."""
    if isinstance(ref, Path):
        check_file(ref, str(ref))
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP; our own limit below is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(ref if isinstance(ref, Path) else io.BytesIO(ref))
            with image:
                if image.format in EXTERNAL_DECODERS:
                    raise ImageError("unreadable_image", f"{_describe(ref)}: {image.format} is not decoded here")
                width, height = image.size  # read from the header, before any pixel is decoded
                if width * height > max_pixels:
                    raise ImageError("image_too_large", f"{width}x{height} is over {max_pixels:,} pixels")
                image.load()  # decodes fully: truncated files fail here, not later in the processor
                return image.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError("image_too_large", f"{_describe(ref)}: {error}") from error
    except Exception as error:
        # A damaged file fails in whatever way its format's decoder happens to: OSError and SyntaxError mostly, but
        # also IndexError (a truncated QOI), struct.error, ValueError, ZeroDivisionError, EOFError... (fuzzed in
        # tests/data/test_fuzz_readers.py). Each is this one file's fault, so each skips this one sample.
        raise ImageError("unreadable_image", f"{_describe(ref)}: {type(error).__name__}: {error}") from error


def image_size(ref: ImageRef) -> tuple[int, int] | None:
    """(width, height) from the image header alone, or None when it cannot be read (decoding will say why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image applies our own limit
            with Image.open(ref if isinstance(ref, Path) else io.BytesIO(ref)) as image:
                return image.size
    except Exception:  # any failure, as in decode_image: the worker decodes it and names the reason
        return None


def _describe(ref: ImageRef) -> str:
    return _shown(str(ref)) if isinstance(ref, Path) else f"<{len(ref)} bytes>"


def _shown(path: str, limit: int = 200) -> str:
    """A path as a message can carry it: NUL bytes visible, a 5,000-character name cut to ``limit``."""
    text = repr(path)[1:-1] if "\0" in path else path
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]} ({len(path)} characters)"
