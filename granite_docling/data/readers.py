"""Readers: every dataset layout becomes a list of :class:`Sample` plus a list of :class:`Problem`.

Layouts (``dataset.<name>.format``; ``auto`` detects them):

* ``docling``: the Docling folder format, ``ROOT/anns/<split>/*.json`` + images, paths relative to ROOT::

      {"img_pth": "images/train/x.png" | [...], "anns": {"user", "assistant", "source"} | [...]}

* ``hub``: the layout of HuggingFaceM4/DoclingMatix and ds4sd/SynthFormulaNet, an ``images`` list (encoded
  images) and a ``texts`` list of ``{user, assistant, source}`` per row; from parquet files, a folder of them, a
  ``datasets.save_to_disk`` folder (Arrow files), or a hub id (needs the ``datasets`` package and network).

Readers check what is cheap to check (JSON, schema, empty answers, image paths inside the root and present);
images are decoded later, in loader workers (:mod:`granite_docling.data.images`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granite_docling.data.images import ImageError, resolve_inside
from granite_docling.data.sample import Problem, Sample, Turn

log = logging.getLogger(__name__)


class DatasetNotFoundError(ValueError):
    """The path is not a dataset in any known layout; the message says what was expected."""


class SchemaError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class ReadOptions:
    """What to keep of each source (the per-dataset options of the config)."""

    split: str = "train"
    max_turns: int | None = None
    max_samples: int | None = None
    max_images_per_sample: int | None = None


# ---------------------------------------------------------------------------------------------------------------
# Pure parsing of one record


def parse_turns(raw: Any) -> list[Turn]:
    """``{user, assistant, source}`` or a list of them -> turns; raises :class:`SchemaError`."""
    entries = [raw] if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise SchemaError("bad_schema", "expected a {user, assistant} object or a non-empty list of them")
    turns = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SchemaError("bad_schema", f"turn {i} is a {type(entry).__name__}, not an object")
        user, assistant, source = entry.get("user"), entry.get("assistant"), entry.get("source")
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise SchemaError("bad_schema", f"turn {i} needs string 'user' and 'assistant' fields")
        if source is not None and not isinstance(source, str):
            raise SchemaError("bad_schema", f"turn {i}: 'source' must be a string")
        if not assistant.strip():
            raise SchemaError("empty_answer", f"turn {i} has an empty assistant answer")
        turns.append(Turn(user=user, assistant=assistant, source=source))
    return turns


def parse_docling_annotation(record: Any) -> tuple[list[str], list[Turn]]:
    """A Docling-format annotation -> (image paths relative to the root, turns); raises :class:`SchemaError`."""
    if not isinstance(record, dict):
        raise SchemaError("bad_schema", f"the file holds a {type(record).__name__}, not an object")
    if "img_pth" not in record or "anns" not in record:
        raise SchemaError("bad_schema", f"needs 'img_pth' and 'anns', has {sorted(record)}")
    paths = record["img_pth"]
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise SchemaError("bad_schema", "'img_pth' must be a path or a list of paths")
    return paths, parse_turns(record["anns"])


def limit(sample: Sample, options: ReadOptions) -> Sample:
    """Keep the first ``max_turns`` turns and the first ``max_images_per_sample`` images."""
    turns = sample.turns[: options.max_turns] if options.max_turns else sample.turns
    images = sample.images[: options.max_images_per_sample] if options.max_images_per_sample else sample.images
    return Sample(id=sample.id, dataset=sample.dataset, images=images, turns=turns, root=sample.root)


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def detect_format(path: str | Path) -> str:
    """'docling' or 'hub'; raises :class:`DatasetNotFoundError` for anything else."""
    path = Path(path)
    if path.is_dir() and (path / "anns").is_dir():
        return "docling"
    if path.is_file() and path.suffix in (".parquet", ".arrow"):
        return "hub"
    if path.is_dir() and (any(path.rglob("*.parquet")) or any(path.rglob("*.arrow"))):
        return "hub"
    if not path.exists() and str(path).count("/") == 1 and not str(path).startswith("."):
        return "hub"  # looks like a hub id: org/name
    raise DatasetNotFoundError(
        f"{path} is not a dataset: expected a Docling folder (anns/<split>/*.json + images), parquet or Arrow "
        "files in the hub layout, or a hub id"
    )


def read_dataset(
    path: str | Path, name: str, options: ReadOptions, fmt: str = "auto"
) -> tuple[list[Sample], list[Problem]]:
    """All good samples of one source (after ``max_samples``) and the problems found on the way."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    reader = read_docling_folder if fmt == "docling" else read_hub
    samples, problems = reader(Path(path), name, options)
    if options.max_samples is not None:
        samples = samples[: options.max_samples]
    return [limit(s, options) for s in samples], problems


def read_docling_folder(root: Path, name: str, options: ReadOptions) -> tuple[list[Sample], list[Problem]]:
    ann_dir = root / "anns" / options.split
    if not ann_dir.is_dir():
        splits = sorted(p.name for p in (root / "anns").iterdir() if p.is_dir()) if (root / "anns").is_dir() else []
        raise DatasetNotFoundError(f"{ann_dir} does not exist; splits found under {root / 'anns'}: {splits or 'none'}")
    samples, problems = [], []
    for file in sorted(ann_dir.glob("*.json")):
        relative = str(file.relative_to(root))
        if options.max_samples is not None and len(samples) >= options.max_samples:
            break
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(Problem(name, relative, "invalid_json", str(error)))
            continue
        try:
            paths, turns = parse_docling_annotation(record)
            images = tuple(_checked_image_path(root, p) for p in paths)
        except (SchemaError, ImageError) as error:
            problems.append(Problem(name, relative, error.reason, error.detail))
            continue
        samples.append(Sample(id=relative, dataset=name, images=images, turns=tuple(turns), root=root))
    return samples, problems


def _checked_image_path(root: Path, relative: str) -> Path:
    path = resolve_inside(root, relative)
    if not path.is_file():
        raise ImageError("missing_image", f"{relative} does not exist")
    return path


def read_hub(path: Path, name: str, options: ReadOptions) -> tuple[list[Sample], list[Problem]]:
    """Rows with ``images`` + ``texts`` from parquet / Arrow files or a hub id."""
    samples, problems = [], []
    for file, row_index, row in _hub_rows(path, options.split):
        if options.max_samples is not None and len(samples) >= options.max_samples:
            break
        row_id = f"{file}#{row_index}"
        try:
            images = tuple(_image_bytes(image) for image in row.get("images") or [])
            turns = parse_turns(row.get("texts"))
        except SchemaError as error:
            problems.append(Problem(name, row_id, error.reason, error.detail))
            continue
        samples.append(Sample(id=row_id, dataset=name, images=images, turns=tuple(turns)))
    return samples, problems


def _image_bytes(image: Any) -> bytes:
    """The encoded bytes of a hub image cell: a {'bytes', 'path'} struct or raw bytes."""
    if isinstance(image, dict):
        image = image.get("bytes")
    if not isinstance(image, bytes) or not image:
        raise SchemaError("bad_schema", "an entry of 'images' holds no encoded image bytes")
    return image


def _hub_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.arrow"))
    of_split = [f for f in files if split in f.relative_to(path).as_posix()]
    return of_split or files


def _hub_rows(path: Path, split: str):
    """(file relative name, row index, row dict) for every row, read one record batch at a time."""
    if not path.exists():
        yield from _hub_id_rows(str(path), split)
        return
    import pyarrow.ipc
    import pyarrow.parquet

    for file in _hub_files(path, split):
        relative = file.name if path.is_file() else file.relative_to(path).as_posix()
        if file.suffix == ".parquet":
            batches = pyarrow.parquet.ParquetFile(file).iter_batches(batch_size=64, columns=["images", "texts"])
        else:
            batches = _arrow_batches(file)
        row_index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield relative, row_index, row
                row_index += 1


def _arrow_batches(file: Path):
    import pyarrow.ipc

    with pyarrow.memory_map(str(file)) as source:
        try:
            reader = pyarrow.ipc.open_stream(source)  # datasets.save_to_disk writes the streaming format
        except pyarrow.ArrowInvalid:
            reader = pyarrow.ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader


def _hub_id_rows(hub_id: str, split: str):
    try:
        import datasets
    except ImportError as error:
        raise DatasetNotFoundError(
            f"{hub_id} is neither a local path nor loadable: reading a hub id needs `pip install datasets` and "
            "network access; or download the parquet files and point dataset.<name>.path at them"
        ) from error
    rows = datasets.load_dataset(hub_id, split=split).cast_column(
        "images", datasets.Sequence(datasets.Image(decode=False))
    )
    for index, row in enumerate(rows):
        yield hub_id, index, row
