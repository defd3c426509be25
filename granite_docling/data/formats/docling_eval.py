"""docling-eval datasets: what docling-eval's builders write (DocLayNet, DP-Bench, OmniDocBench, FUNSD, CVAT
deliveries, ...): parquet shards ``<out>/<split>/shard_*.parquet`` (or a hub id), one row per document with
``GroundTruthDocument`` (a DoclingDocument as JSON) and ``GroundTruthPageImages`` (the pages in page order).
One sample per page (``unit=page``): the page image, the model card's prompt and the page's DocTags; or one
multi-page sample per document (``unit=document``). ``auto`` tells it from the hub layout by the
``GroundTruthDocument`` column. Indexed, not streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from granite_docling.data.answers import PAGE_PROMPT, document_doctags, page_doctags
from granite_docling.data.formats.arrow import image_bytes, is_saved_dataset, open_arrow_dataset
from granite_docling.data.formats.base import DatasetNotFoundError, ReadOptions, RecordError, Source, is_unicode, limit
from granite_docling.data.formats.hub import HubSource
from granite_docling.data.sample import Problem, Sample, Turn

GROUND_TRUTH = "GroundTruthDocument"  # docling-eval's columns
PAGE_IMAGES = "GroundTruthPageImages"
DOCUMENT_ID = "document_id"
PAGE_STRIDE = 1 << 16  # a docling_eval locator is row * PAGE_STRIDE + the page's position among the row's images


def page_images(doc, images: Sequence[Any]) -> tuple[list[tuple[int, Any]], list[int]]:
    """((page number, image) for each page of ``doc`` that has one, page numbers without one). docling-eval
    writes ``GroundTruthPageImages`` in page order, one per page that has an image; raises :class:`RecordError`
    when the two cannot be matched."""
    pages = sorted(doc.pages)
    if len(images) == len(pages):
        return list(zip(pages, images, strict=True)), []
    with_image = [page_no for page_no in pages if doc.pages[page_no].image is not None]
    if images and len(with_image) == len(images):
        return list(zip(with_image, images, strict=True)), sorted(set(pages) - set(with_image))
    raise RecordError("missing_page_image", f"{len(images)} page images for the {len(pages)} pages of the document")


class DoclingEvalSource(Source):
    """docling-eval's rows (``GroundTruthDocument`` + ``GroundTruthPageImages``) in a memory-mapped Arrow table:
    one sample per page image (``unit=page``) or per row (``unit=document``)."""

    format_name = "docling_eval"
    not_streamed = "docling-eval datasets are indexed, not streamed"

    def __init__(self, path: str | Path, name: str, options: ReadOptions, cache_dir: Path | None = None):
        self.path = path
        self.name = name
        self.options = options
        self.cache_dir = cache_dir
        if (problem := self.layout_problem(Path(path), options.split)) is not None:
            what, splits = problem
            raise DatasetNotFoundError(
                f"{path} {what} (its splits: {', '.join(splits) or 'none'}); set dataset.<name>.split "
                "(granite-docling validate: --split)"
            )
        self._dataset, self._fingerprint = open_arrow_dataset(path, options.split, cache_dir)
        missing = {GROUND_TRUTH, PAGE_IMAGES} - set(self._dataset.column_names)
        if missing:
            raise DatasetNotFoundError(
                f"{path} has columns {self._dataset.column_names}; a docling-eval dataset needs {sorted(missing)}"
            )
        self._table = self._dataset.data
        self._columns = [c for c in (GROUND_TRUTH, PAGE_IMAGES, DOCUMENT_ID) if c in self._dataset.column_names]
        self._starts: np.ndarray | None = None  # the first sample of each row (index builds only)

    @classmethod
    def detect(cls, path: Path, columns: Callable[[], Sequence[str]]) -> bool:
        """Hub-layout files (or a hub id) whose columns hold ``GroundTruthDocument``."""
        return HubSource.detect(path, columns) and GROUND_TRUTH in columns()

    @classmethod
    def layout_problem(cls, path: Path, split: str) -> tuple[str, list[str]] | None:
        """A local folder of docling-eval shards must hold the split (``<out>/<split>/shard_*.parquet``): no silent
        fall-back to every file, which would train on the test split. (what is wrong, the splits it holds)."""
        if not path.is_dir() or is_saved_dataset(path):
            return None
        files = sorted(path.rglob("*.parquet"))
        if files and not any(split in f.relative_to(path).as_posix() for f in files):
            splits = sorted({f.relative_to(path).parts[0] for f in files if len(f.relative_to(path).parts) > 1})
            return f"has no {split!r} split", splits
        return None

    def fingerprint(self) -> str:
        return f"{self._fingerprint}-{self.options.unit}"

    def starts(self) -> np.ndarray:
        """Row r's samples are ``starts[r]:starts[r + 1]``: one per page image (at least one, so that a row
        without images is reported), or one per row."""
        if self._starts is None:
            import pyarrow.compute as pc

            rows = self._dataset.num_rows
            if self.options.unit == "document":
                counts = np.ones(rows, dtype=np.int64)
            else:
                lengths = pc.list_value_length(self._table.column(PAGE_IMAGES)).fill_null(0)
                counts = np.maximum(1, lengths.to_numpy(zero_copy_only=False).astype(np.int64))
            self._starts = np.concatenate([[0], np.cumsum(counts)])
        return self._starts

    def __len__(self) -> int:
        return int(self.starts()[-1])

    def locator(self, i: int) -> int:
        row = int(np.searchsorted(self.starts(), i, side="right")) - 1
        return row * PAGE_STRIDE + (i - int(self.starts()[row]))

    def record_id(self, locator: str | int) -> str:
        row, position = divmod(int(locator), PAGE_STRIDE)
        where = f"{Path(str(self.path)).name}#{row}"
        return where if self.options.unit == "document" else f"{where} page image {position}"

    def _row(self, row: int) -> dict:
        (record,) = self._table.fast_slice(row, 1).select(self._columns).to_pylist()
        return record

    def read(self, locator: str | int) -> Sample:
        row, position = divmod(int(locator), PAGE_STRIDE)
        record = self._row(row)
        doc, pages, _ = self.parse(record)
        return self.sample_of(doc, pages, position, self._row_name(record, row))

    def _row_name(self, record: dict, row: int) -> str:
        return record.get(DOCUMENT_ID) or f"{Path(str(self.path)).name}#{row}"

    def parse(self, record: dict):
        """(DoclingDocument, [(page number, image bytes)], page numbers without an image); raises RecordError."""
        from docling_core.types.doc import DoclingDocument
        from pydantic import ValidationError

        text = record.get(GROUND_TRUTH)
        if not isinstance(text, str) or not text:
            raise RecordError("bad_document", "GroundTruthDocument is empty")
        try:
            doc = DoclingDocument.model_validate_json(text)
        except ValidationError as error:
            raise RecordError("bad_document", str(error).splitlines()[0]) from error
        except Exception as error:  # docling-core's own validators fail with IndexError, ZeroDivisionError...
            raise RecordError("bad_document", f"{type(error).__name__}: {error}") from error
        pages, without = page_images(doc, record.get(PAGE_IMAGES) or [])
        return doc, [(page_no, image_bytes(image)) for page_no, image in pages], without

    def sample_of(self, doc, pages: list[tuple[int, bytes]], position: int, name: str) -> Sample:
        if self.options.unit == "document":
            numbers = [page_no for page_no, _ in pages]
            turn = Turn(PAGE_PROMPT, exported(document_doctags, doc, numbers), source=name)
            sample = Sample(id=name, dataset=self.name, images=tuple(image for _, image in pages), turns=(turn,))
            return limit(sample, self.options)
        if position >= len(pages):
            raise RecordError("missing_page_image", f"the document has {len(pages)} page images, not {position + 1}")
        page_no, image = pages[position]
        page = f"{name}#page={page_no}"
        turn = Turn(PAGE_PROMPT, exported(page_doctags, doc, page_no), source=page)
        return Sample(id=page, dataset=self.name, images=(image,), turns=(turn,))

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Sample | Problem]]:
        """Each row parsed once; a row that cannot be used is named once, at its first sample, and its other
        samples are left out; so are pages without an image, named once beside the row's first page."""
        stop = len(self) if stop is None else min(stop, len(self))
        starts = self.starts()
        first_row = int(np.searchsorted(starts, start, side="right")) - 1
        last_row = int(np.searchsorted(starts, stop - 1, side="right")) - 1 if stop > start else first_row - 1
        for row in range(first_row, last_row + 1):
            record = self._row(row)
            name = self._row_name(record, row)
            samples = range(max(start, int(starts[row])), min(stop, int(starts[row + 1])))
            try:
                doc, pages, without = self.parse(record)
            except RecordError as error:
                if samples and samples[0] == starts[row]:
                    yield samples[0], Problem(self.name, name, error.reason, error.detail)
                continue
            if without and samples and samples[0] == starts[row]:
                yield samples[0], Problem(self.name, name, "missing_page_image", f"pages {without} have no image")
            for i in samples:
                try:
                    yield i, self.sample_of(doc, pages, i - int(starts[row]), name)
                except RecordError as error:
                    yield i, Problem(self.name, f"{name} page image {i - int(starts[row])}", error.reason, error.detail)

    def __getstate__(self) -> dict:  # spawned workers map the same files again instead of pickling the table
        return {"path": self.path, "name": self.name, "options": self.options, "cache_dir": self.cache_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def exported(export, doc, pages) -> str:
    """``export(doc, pages)``: a document's DocTags, or :class:`RecordError` ``bad_document`` when docling-core
    cannot write them (a page of size 0, a caption in docling-core 2.102-2.104...) or they are no valid Unicode."""
    try:
        doctags = export(doc, pages)
    except Exception as error:
        raise RecordError("bad_document", f"DocTags export failed: {type(error).__name__}: {error}") from error
    if not is_unicode(doctags):
        raise RecordError("bad_document", "the DocTags hold a lone surrogate (\\ud800-\\udfff)")
    return doctags
