"""Sources: where a dataset's records live, and how to read one record into a :class:`Sample`.

Layouts (``dataset.<name>.format``; ``auto`` detects them):

* ``docling``: the Docling folder format, ``ROOT/anns/<split>/*.json`` + images, paths relative to ROOT::

      {"img_pth": "images/train/x.png" | [...], "anns": {"user", "assistant", "source"} | [...]}

* ``docling_eval``: the datasets docling-eval's builders write (DocLayNet, DP-Bench, OmniDocBench, FUNSD, CVAT
  deliveries, ...): parquet shards ``<out>/<split>/shard_*.parquet`` (or a hub id), one row per document with
  ``GroundTruthDocument`` (a DoclingDocument as JSON) and ``GroundTruthPageImages`` (the pages in page order).
  One sample per page (``unit=page``): the page image, the model card's prompt and the page's DocTags; or one
  multi-page sample per document (``unit=document``). ``auto`` picks it from the ``GroundTruthDocument`` column.
* ``hub``: the layout of HuggingFaceM4/DoclingMatix and ds4sd/SynthFormulaNet, an ``images`` list (encoded
  images) and a ``texts`` list of ``{user, assistant, source}`` per row: parquet files or a folder of them, a
  ``datasets.save_to_disk`` folder or Arrow files, or a hub id. Read through HF ``datasets`` as memory-mapped
  Arrow: parquet and hub ids are converted once into its cache (under ``data.index_cache_dir``), Arrow files
  and ``save_to_disk`` folders are mapped where they are. Nothing is loaded into memory.

A source addresses records by a *locator* (the annotation file's relative name, the row number, or row and page
packed into one number) and reads
one at a time: :meth:`Source.read` parses and checks what is cheap to check (JSON, schema, empty answers, image
paths inside the root and present) and raises :class:`RecordError` with a reason key of
:data:`~granite_docling.data.sample.REASONS`. Images are decoded later, in loader workers
(:mod:`granite_docling.data.images`). :func:`read_dataset` reads a whole (small) source into a list, for
``validate``, evaluation and tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from granite_docling.data.doctags import PAGE_PROMPT, document_doctags, page_doctags
from granite_docling.data.images import ImageError, check_file, resolve_inside
from granite_docling.data.sample import Problem, Sample, Turn

log = logging.getLogger(__name__)


class DatasetNotFoundError(ValueError):
    """The path is not a dataset in any known layout, or holds no usable sample; the message says what to do."""


class RecordError(ValueError):
    """One record cannot be used; ``reason`` is a key of REASONS."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class ReadOptions:
    """What to keep of each source (the per-dataset options of the config)."""

    split: str = "train"
    max_turns: int | None = None
    max_samples: int | None = None
    max_images_per_sample: int | None = None
    unit: str = "page"  # docling_eval: one sample per page, or per document


# ---------------------------------------------------------------------------------------------------------------
# Pure parsing of one record


def parse_turns(raw: Any) -> list[Turn]:
    """``{user, assistant, source}`` or a list of them -> turns; raises :class:`RecordError`."""
    entries = [raw] if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise RecordError("bad_schema", "expected a {user, assistant} object or a non-empty list of them")
    turns = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RecordError("bad_schema", f"turn {i} is a {type(entry).__name__}, not an object")
        user = entry.get("user")
        assistant = entry.get("assistant")
        source = entry.get("source")
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise RecordError("bad_schema", f"turn {i} needs string 'user' and 'assistant' fields")
        if source is not None and not isinstance(source, str):
            raise RecordError("bad_schema", f"turn {i}: 'source' must be a string")
        for key, text in (("user", user), ("assistant", assistant), ("source", source or "")):
            if not is_unicode(text):
                raise RecordError("bad_schema", f"turn {i}: {key!r} holds a lone surrogate (\\ud800-\\udfff)")
        if not assistant.strip():
            raise RecordError("empty_answer", f"turn {i} has an empty assistant answer")
        turns.append(Turn(user=user, assistant=assistant, source=source))
    return turns


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode: JSON's ``\\ud800`` escapes give lone surrogates, which the tokenizer
    refuses (a TypeError, mid-batch)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_docling_annotation(record: Any) -> tuple[list[str], list[Turn]]:
    """A Docling-format annotation -> (image paths relative to the root, turns); raises :class:`RecordError`."""
    if not isinstance(record, dict):
        raise RecordError("bad_schema", f"the file holds a {type(record).__name__}, not an object")
    if "img_pth" not in record or "anns" not in record:
        raise RecordError("bad_schema", f"needs 'img_pth' and 'anns', has {sorted(record)}")
    paths = record["img_pth"]
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RecordError("bad_schema", "'img_pth' must be a path or a list of paths")
    return paths, parse_turns(record["anns"])


def limit(sample: Sample, options: ReadOptions) -> Sample:
    """Keep the first ``max_turns`` turns and the first ``max_images_per_sample`` images."""
    turns = sample.turns[: options.max_turns] if options.max_turns else sample.turns
    images = sample.images[: options.max_images_per_sample] if options.max_images_per_sample else sample.images
    return Sample(id=sample.id, dataset=sample.dataset, images=images, turns=turns, root=sample.root)


def image_bytes(image: Any) -> bytes:
    """The encoded bytes of a hub image cell: a {'bytes', 'path'} struct or raw bytes."""
    if isinstance(image, dict):
        image = image.get("bytes")
    if not isinstance(image, bytes) or not image:
        raise RecordError("bad_schema", "an entry of 'images' holds no encoded image bytes")
    return image


def hub_sample(row: dict, record_id: str, dataset: str, options: ReadOptions) -> Sample:
    """A row of the hub layout (``images``, ``texts``) as a Sample; raises :class:`RecordError` when it is bad."""
    cells = row.get("images")
    if cells is not None and not isinstance(cells, list):
        raise RecordError("bad_schema", f"'images' must be a list of encoded images (found {type(cells).__name__})")
    images = tuple(image_bytes(image) for image in cells or [])
    turns = tuple(parse_turns(row.get("texts")))
    return limit(Sample(id=record_id, dataset=dataset, images=images, turns=turns), options)


def files_fingerprint(files: Sequence[Path], root: Path) -> str:
    """A digest of (name, size, modification time) of every file: any change, addition or removal shows."""
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(
            f"{file.relative_to(root) if file != root else file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------------
# Layouts


class Source:
    """One dataset's records: ``len`` of them, each read by locator. Subclasses say where they live."""

    name: str
    options: ReadOptions

    def fingerprint(self) -> str:
        """Changes whenever a record could have changed (cheap: file sizes and times, not contents)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def locator(self, i: int) -> str | int:
        """How record ``i`` (in the source's own order) is addressed; the index stores it."""
        raise NotImplementedError

    def record_id(self, locator: str | int) -> str:
        """The name a person finds the record by (bad_samples.jsonl, validate)."""
        raise NotImplementedError

    def read(self, locator: str | int) -> Sample:
        """The record as a Sample (``max_turns`` / ``max_images_per_sample`` applied); raises RecordError."""
        raise NotImplementedError

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Sample | Problem]]:
        """(i, Sample or Problem) for records ``start..stop`` in order."""
        for i in range(start, len(self) if stop is None else stop):
            locator = self.locator(i)
            try:
                yield i, self.read(locator)
            except RecordError as error:
                yield i, Problem(self.name, self.record_id(locator), error.reason, error.detail)


class FolderSource(Source):
    """A Docling folder: one JSON file per record under ``anns/<split>/``, sorted by name."""

    def __init__(self, root: Path, name: str, options: ReadOptions):
        self.root = Path(root)
        self.name = name
        self.options = options
        self.ann_dir = self.root / "anns" / options.split
        if not self.ann_dir.is_dir():
            anns = self.root / "anns"
            splits = sorted(p.name for p in anns.iterdir() if p.is_dir()) if anns.is_dir() else []
            raise DatasetNotFoundError(f"{self.ann_dir} does not exist; splits found under {anns}: {splits or 'none'}")
        self._names: list[str] | None = None

    def fingerprint(self) -> str:
        """Order-independent sum of every annotation file's (name, size, mtime) hash: no list of names is kept."""
        total = 0
        count = 0
        with os.scandir(self.ann_dir) as entries:
            for entry in entries:
                if is_annotation(entry):
                    stat = _stat(entry)
                    key = f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8", "surrogateescape")
                    total += int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little")
                    count += 1
        return hashlib.sha256(f"folder\0{self.ann_dir.resolve()}\0{count}\0{total % 2**128}".encode()).hexdigest()[:32]

    def names(self) -> list[str]:
        """The annotation file names, sorted (listed once, when an index is built)."""
        if self._names is None:
            with os.scandir(self.ann_dir) as entries:
                self._names = sorted(e.name for e in entries if is_annotation(e))
        return self._names

    def __len__(self) -> int:
        return len(self.names())

    def forget_names(self) -> None:
        self._names = None

    def locator(self, i: int) -> str:
        return self.names()[i]

    def record_id(self, locator: str | int) -> str:
        return f"anns/{self.options.split}/{locator}"

    def read(self, locator: str | int) -> Sample:
        relative = self.record_id(locator)
        try:
            path = resolve_inside(self.root, relative)  # a symlink out of the dataset is refused, as for images
        except ImageError as error:
            reason = error.reason if error.reason == "path_outside_root" else "invalid_json"
            raise RecordError(reason, error.detail) from error
        try:
            if not path.is_file():  # a FIFO or device behind a symlink would block the read forever
                raise RecordError("invalid_json", "the file is gone" if not path.exists() else "not a regular file")
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordError("invalid_json", str(error)) from error
        except RecursionError as error:  # [[[[... thousands deep
            raise RecordError("invalid_json", "nested too deeply to parse") from error
        paths, turns = parse_docling_annotation(record)
        try:
            images = tuple(_checked_image_path(self.root, p) for p in paths)
        except ImageError as error:
            raise RecordError(error.reason, error.detail) from error
        sample = Sample(id=relative, dataset=self.name, images=images, turns=tuple(turns), root=self.root)
        return limit(sample, self.options)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_names": None}  # workers read by name; they never need the whole list


def _checked_image_path(root: Path, relative: str) -> Path:
    path = resolve_inside(root, relative)
    check_file(path, relative)
    return path


def is_annotation(entry: os.DirEntry) -> bool:
    """A ``*.json`` entry of ``anns/<split>``: a file, or a symlink (named when it leads nowhere or outside)."""
    return entry.name.endswith(".json") and (entry.is_symlink() or entry.is_file())


def _stat(entry: os.DirEntry) -> os.stat_result:
    try:
        return entry.stat()
    except OSError:  # a symlink that leads nowhere: its own times still show a change
        return entry.stat(follow_symlinks=False)


class HubSource(Source):
    """Rows with ``images`` + ``texts`` in a memory-mapped Arrow table (HF ``datasets``)."""

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

    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return self._dataset.num_rows

    def locator(self, i: int) -> int:
        return i

    def record_id(self, locator: str | int) -> str:
        return f"{Path(str(self.path)).name}#{locator}"

    def read(self, locator: str | int) -> Sample:
        (row,) = self._table.fast_slice(int(locator), 1).select(["images", "texts"]).to_pylist()
        return hub_sample(row, self.record_id(locator), self.name, self.options)

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Sample | Problem]]:
        """Read a record batch at a time: one Arrow slice per 64 rows, not one per row."""
        stop = len(self) if stop is None else stop
        for batch_start in range(start, stop, 64):
            rows = self._table.fast_slice(batch_start, min(64, stop - batch_start)).select(["images", "texts"])
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

    def __init__(self, path: str | Path, name: str, options: ReadOptions, cache_dir: Path | None = None):
        self.path = path
        self.name = name
        self.options = options
        self.cache_dir = cache_dir
        check_split_folder(path, options.split)
        self._dataset, self._fingerprint = open_arrow_dataset(path, options.split, cache_dir)
        missing = {GROUND_TRUTH, PAGE_IMAGES} - set(self._dataset.column_names)
        if missing:
            raise DatasetNotFoundError(
                f"{path} has columns {self._dataset.column_names}; a docling-eval dataset needs {sorted(missing)}"
            )
        self._table = self._dataset.data
        self._columns = [c for c in (GROUND_TRUTH, PAGE_IMAGES, DOCUMENT_ID) if c in self._dataset.column_names]
        self._starts: np.ndarray | None = None  # the first sample of each row (index builds only)

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


def check_split_folder(path: str | Path, split: str) -> None:
    """A local folder of docling-eval shards must hold the split (``<out>/<split>/shard_*.parquet``): no silent
    fall-back to every file, which would train on the test split."""
    local = Path(path)
    if not local.is_dir() or (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        return
    files = sorted(local.rglob("*.parquet"))
    if files and not any(split in f.relative_to(local).as_posix() for f in files):
        splits = sorted({f.relative_to(local).parts[0] for f in files if len(f.relative_to(local).parts) > 1})
        raise DatasetNotFoundError(
            f"{local} has no {split!r} split (its splits: {', '.join(splits) or 'none'}); set dataset.<name>.split "
            "(granite-docling validate: --split)"
        )


def arrow_columns(path: str | Path, split: str, cache_dir: Path | None) -> list[str]:
    """The column names of parquet / Arrow data or a hub id (parquet: from the first file's footer alone)."""
    local = Path(path)
    if local.exists() and not (local / "state.json").is_file() and not (local / "dataset_dict.json").is_file():
        files = hub_files(local, split)
        if files and files[0].suffix == ".parquet":
            import pyarrow.parquet as pq

            with reading(files[0]):
                return pq.read_schema(files[0]).names
    dataset, _ = open_arrow_dataset(path, split, cache_dir)
    return dataset.column_names


def hub_files(path: Path, split: str) -> list[Path]:
    """The parquet (or else Arrow) files of a split under ``path``: names containing the split, else all."""
    if path.is_file():
        return [path]
    arrow = sorted(p for p in path.rglob("*.arrow") if not p.name.startswith("cache-"))  # not datasets' own caches
    files = sorted(path.rglob("*.parquet")) or arrow
    of_split = [f for f in files if split in f.relative_to(path).as_posix()]
    return of_split or files


def open_arrow_dataset(path: str | Path, split: str, cache_dir: Path | None):
    """(datasets.Dataset, fingerprint) for a parquet file or folder, Arrow files, a save_to_disk folder or hub id."""
    try:
        import datasets
    except ImportError as error:  # a dependency; only a broken install lands here
        raise DatasetNotFoundError(f"reading {path} needs HF datasets: pip install datasets") from error
    cache = str(cache_dir / "arrow") if cache_dir else None
    local = Path(path)
    if not local.exists():  # a hub id: downloaded and converted into the cache once
        with reading(path):
            dataset = datasets.load_dataset(str(path), split=split, cache_dir=cache)
        return dataset, dataset._fingerprint
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        with reading(local):
            dataset = datasets.load_from_disk(str(local))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DatasetNotFoundError(f"{local} has splits {sorted(dataset)}, not {split!r}")
            dataset = dataset[split]
        return dataset, f"disk-{dataset._fingerprint}"
    files = hub_files(local, split)
    if not files:
        raise DatasetNotFoundError(f"{local} holds no parquet or Arrow files")
    fingerprint = files_fingerprint(files, local if local.is_dir() else local.parent)
    if files[0].suffix == ".arrow":
        with reading(local):
            dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
        return dataset, fingerprint
    with_rows = [f for f, rows in zip(files, parquet_rows(files), strict=True) if rows]  # datasets fails on 0 rows
    if not with_rows:
        raise DatasetNotFoundError(f"{local}: its parquet files hold no rows ({len(files)} file(s))")
    processes = min(len(with_rows), available_cpus())
    with reading(local):
        dataset = datasets.load_dataset(
            "parquet",
            data_files=[str(f) for f in with_rows],
            split="train",
            cache_dir=cache,
            num_proc=processes if processes > 1 else None,
        )
    return dataset, fingerprint


def parquet_rows(files: Sequence[Path]) -> list[int]:
    """Rows of each parquet file, from its footer; a file that is no parquet (empty, text, cut short) is named."""
    import pyarrow.parquet as pq

    rows = []
    for file in files:
        with reading(file):
            rows.append(pq.read_metadata(file).num_rows)
    return rows


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Around pyarrow / HF datasets reading ``path``: their errors on a damaged or foreign file (ArrowInvalid,
    DatasetGenerationError, OSError...) become one :class:`DatasetNotFoundError` line naming the path."""
    import pyarrow as pa
    from datasets.exceptions import DatasetsError

    try:
        yield
    except DatasetNotFoundError:
        raise
    except (pa.ArrowException, DatasetsError, OSError, ValueError) as error:
        # DatasetGenerationError says only "An error occurred while generating the dataset"; its cause says what
        shown = (error.__cause__ or error.__context__ or error) if isinstance(error, DatasetsError) else error
        first_line = (str(shown).strip().splitlines() or [""])[0]
        raise DatasetNotFoundError(f"{path} cannot be read: {type(shown).__name__}: {first_line}") from error


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def detect_format(path: str | Path) -> str:
    """'docling' or 'hub'; raises :class:`DatasetNotFoundError` for anything else."""
    path = Path(path)
    if path.is_dir() and (path / "anns").is_dir():
        return "docling"
    if path.is_file() and path.suffix in (".parquet", ".arrow"):
        return "hub"
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return "hub"
    if path.is_dir() and (any(path.rglob("*.parquet")) or any(path.rglob("*.arrow"))):
        return "hub"
    if not path.exists() and str(path).count("/") == 1 and not str(path).startswith("."):
        return "hub"  # looks like a hub id: org/name
    raise DatasetNotFoundError(
        f"{path} is not a dataset: expected a Docling folder (anns/<split>/*.json + images), parquet or Arrow "
        "files in the hub layout, or a hub id"
    )


def open_source(
    path: str | Path, name: str, options: ReadOptions, fmt: str = "auto", cache_dir: Path | None = None
) -> Source:
    """The source behind ``path`` in its layout."""
    detected = detect_format(path) if fmt == "auto" else fmt
    if detected == "docling":
        return FolderSource(Path(path), name, options)
    if fmt == "auto" and GROUND_TRUTH in arrow_columns(path, options.split, cache_dir):
        detected = "docling_eval"  # parquet, Arrow or a hub id: the columns tell docling-eval's from the hub's
    if detected == "docling_eval":
        return DoclingEvalSource(path, name, options, cache_dir)
    return HubSource(path, name, options, cache_dir)


def read_dataset(
    path: str | Path, name: str, options: ReadOptions, fmt: str = "auto", cache_dir: Path | None = None
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
