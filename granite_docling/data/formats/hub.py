"""The hub layout of HuggingFaceM4/DoclingMatix and ds4sd/SynthFormulaNet: per row an ``images`` list (encoded
images) and a ``texts`` list of ``{user, assistant, source}``. Parquet files or a folder of them, a
``datasets.save_to_disk`` folder or Arrow files, or a hub id, read through HF ``datasets`` as memory-mapped Arrow:
parquet and hub ids are converted once into its cache (under ``data.index_cache_dir``), Arrow files and
``save_to_disk`` folders are mapped where they are. Nothing is loaded into memory. It streams
(:mod:`granite_docling.data.streaming` reads its parquet files). :func:`is_hub_id` is the one rule for "a dataset
path that names a hub repository".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from granite_docling.data.formats.arrow import image_bytes, is_saved_dataset, open_arrow_dataset
from granite_docling.data.formats.base import DatasetNotFoundError, ReadOptions, RecordError, Source, limit, parse_turns
from granite_docling.data.sample import Problem, Sample

COLUMNS = ["images", "texts"]


def is_hub_id(path: str) -> bool:
    """True for an ``org/name`` that is no path here and no URL: ``datasets`` and streaming look it up on the hub.
    '/data', './x', 'a/b/c', 'name' and 's3://b/x' are not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "://" in path or path.count("/") != 1 or Path(path).exists():
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def hub_sample(row: dict, record_id: str, dataset: str, options: ReadOptions) -> Sample:
    """A row of the hub layout (``images``, ``texts``) as a Sample; raises :class:`RecordError` when it is bad."""
    cells = row.get("images")
    if cells is not None and not isinstance(cells, list):
        raise RecordError("bad_schema", f"'images' must be a list of encoded images (found {type(cells).__name__})")
    images = tuple(image_bytes(image) for image in cells or [])
    turns = tuple(parse_turns(row.get("texts")))
    return limit(Sample(id=record_id, dataset=dataset, images=images, turns=turns), options)


class HubSource(Source):
    """Rows with ``images`` + ``texts`` in a memory-mapped Arrow table (HF ``datasets``)."""

    format_name = "hub"
    streams = True  # granite_docling.data.streaming reads its parquet files: COLUMNS of each row, by hub_sample

    def __init__(self, path: str | Path, name: str, options: ReadOptions, cache_dir: Path | None = None):
        self.path = path
        self.name = name
        self.options = options
        self.cache_dir = cache_dir
        self._dataset, self._fingerprint = open_arrow_dataset(path, options.split, cache_dir)
        missing = {"images", "texts"} - set(self._dataset.column_names)
        if missing:
            raise DatasetNotFoundError(
                f"{path} has columns {self._dataset.column_names}; the hub layout needs 'images' and 'texts'"
            )
        self._table = self._dataset.data  # datasets.table.Table: memory-mapped, bisect-based slicing

    @classmethod
    def detect(cls, path: Path, columns: Callable[[], Sequence[str]]) -> bool:
        """Parquet or Arrow files (or a folder holding some), a ``save_to_disk`` folder, or a hub id."""
        if path.is_file():
            return path.suffix in (".parquet", ".arrow")
        if is_saved_dataset(path):
            return True
        if path.is_dir():
            return any(path.rglob("*.parquet")) or any(path.rglob("*.arrow"))
        return is_hub_id(str(path))

    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return self._dataset.num_rows

    def locator(self, i: int) -> int:
        return i

    def record_id(self, locator: str | int) -> str:
        return f"{Path(str(self.path)).name}#{locator}"

    def read(self, locator: str | int) -> Sample:
        (row,) = self._table.fast_slice(int(locator), 1).select(COLUMNS).to_pylist()
        return hub_sample(row, self.record_id(locator), self.name, self.options)

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Sample | Problem]]:
        """Read a record batch at a time: one Arrow slice per 64 rows, not one per row."""
        stop = len(self) if stop is None else stop
        for batch_start in range(start, stop, 64):
            rows = self._table.fast_slice(batch_start, min(64, stop - batch_start)).select(COLUMNS)
            for offset, row in enumerate(rows.to_pylist()):
                i = batch_start + offset
                try:
                    yield i, hub_sample(row, self.record_id(i), self.name, self.options)
                except RecordError as error:
                    yield i, Problem(self.name, self.record_id(i), error.reason, error.detail)

    def __getstate__(self) -> dict:  # spawned workers map the same files again instead of pickling the table
        return {"path": self.path, "name": self.name, "options": self.options, "cache_dir": self.cache_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
