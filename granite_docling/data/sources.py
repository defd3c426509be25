"""Sources: where a dataset's records live, and how to read one record into a :class:`Sample`; the front door to the
formats of :mod:`granite_docling.data.formats` (``dataset.<name>.format``; ``auto`` detects them):

* ``docling``: the Docling folder format, ``ROOT/anns/<split>/*.json`` + images (:mod:`.formats.folder`);
* ``docling_eval``: the parquet datasets docling-eval's builders write (:mod:`.formats.docling_eval`);
* ``hub``: ``images`` + ``texts`` rows in parquet / Arrow files or a hub id (:mod:`.formats.hub`).

A source addresses records by a *locator* (the annotation file's relative name, the row number, or row and page
packed into one number) and reads one at a time: :meth:`Source.read` parses and checks what is cheap to check
(JSON, schema, empty answers, image paths inside the root and present) and raises :class:`RecordError` with a
reason key of :data:`~granite_docling.data.sample.REASONS`. Images are decoded later, in loader workers
(:mod:`granite_docling.data.images`). :func:`read_dataset` reads a whole (small) source into a list, for
``validate``, evaluation and tests.
"""

from __future__ import annotations

from pathlib import Path

from granite_docling.data.formats import AUTO, FORMATS, detect_format, format_problems
from granite_docling.data.formats.arrow import arrow_columns
from granite_docling.data.formats.base import DatasetNotFoundError, ReadOptions, RecordError, Source
from granite_docling.data.formats.hub import is_hub_id
from granite_docling.data.sample import Problem, Sample

__all__ = [
    "DatasetNotFoundError",
    "ReadOptions",
    "RecordError",
    "Source",
    "detect_format",
    "format_problems",
    "is_hub_id",
    "open_source",
    "read_dataset",
]


def open_source(
    path: str | Path, name: str, options: ReadOptions, fmt: str = AUTO, cache_dir: Path | None = None
) -> Source:
    """The source behind ``path`` in format ``fmt`` (``auto``: the one :func:`detect_format` finds, reading the
    column names of parquet / Arrow data or a hub id when a format needs them)."""
    if fmt == AUTO:
        columns: list[str] | None = None

        def read_columns() -> list[str]:
            nonlocal columns
            if columns is None:
                columns = arrow_columns(path, options.split, cache_dir)
            return columns

        fmt = detect_format(path, read_columns)
    if fmt not in FORMATS:
        raise DatasetNotFoundError(f"format {fmt!r} is not one of {', '.join([AUTO, *FORMATS])}")
    return FORMATS[fmt](path, name, options, cache_dir)


def read_dataset(
    path: str | Path, name: str, options: ReadOptions, fmt: str = AUTO, cache_dir: Path | None = None
) -> tuple[list[Sample], list[Problem]]:
    """All good samples of a small source in a list (after ``max_samples``), and the problems found on the way.
    Training never calls this: it reads through the index (:mod:`granite_docling.data.index`)."""
    source = open_source(path, name, options, fmt, cache_dir)
    samples = []
    problems = []
    for _, item in source.records():
        if options.max_samples is not None and len(samples) >= options.max_samples:
            break
        (problems if isinstance(item, Problem) else samples).append(item)
    return samples, problems
