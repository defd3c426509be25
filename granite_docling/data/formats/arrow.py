"""Parquet and Arrow data, shared by the formats stored in it (:mod:`.hub`, :mod:`.docling_eval`) and by streaming:
find a split's files, open them as one memory-mapped HF ``datasets`` table, and name a damaged file in one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from granite_docling.data.formats.base import DatasetNotFoundError, RecordError, files_fingerprint


def is_saved_dataset(path: Path) -> bool:
    """A ``datasets.save_to_disk`` folder (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def image_bytes(image: Any) -> bytes:
    """The encoded bytes of a hub image cell: a {'bytes', 'path'} struct or raw bytes."""
    if isinstance(image, dict):
        image = image.get("bytes")
    if not isinstance(image, bytes) or not image:
        raise RecordError("bad_schema", "an entry of 'images' holds no encoded image bytes")
    return image


def arrow_columns(path: str | Path, split: str, cache_dir: Path | None) -> list[str]:
    """The column names of parquet / Arrow data or a hub id (parquet: from the first file's footer alone)."""
    local = Path(path)
    if local.exists() and not is_saved_dataset(local):
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
    if is_saved_dataset(local):
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
