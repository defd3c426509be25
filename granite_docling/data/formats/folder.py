"""The Docling folder format: ``ROOT/anns/<split>/*.json`` + images, image paths relative to ROOT::

    {"img_pth": "images/train/x.png" | [...], "anns": {"user", "assistant", "source"} | [...]}

One record per annotation file, addressed by its name. Indexed, not streamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from granite_docling.data.formats.base import DatasetNotFoundError, ReadOptions, RecordError, Source, limit, parse_turns
from granite_docling.data.images import ImageError, check_file, resolve_inside
from granite_docling.data.sample import Sample, Turn


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


class FolderSource(Source):
    """A Docling folder: one JSON file per record under ``anns/<split>/``, sorted by name."""

    format_name = "docling"
    not_streamed = "streaming reads parquet in the hub layout, not a Docling folder"

    def __init__(self, root: str | Path, name: str, options: ReadOptions, cache_dir: Path | None = None):
        self.root = Path(root)
        self.name = name
        self.options = options
        self.ann_dir = self.root / "anns" / options.split
        if (problem := self.layout_problem(self.root, options.split)) is not None:
            what, splits = problem
            anns = self.root / "anns"
            raise DatasetNotFoundError(f"{self.root} {what}; splits found under {anns}: {splits or 'none'}")
        self._names: list[str] | None = None

    @classmethod
    def detect(cls, path: Path, columns: Callable[[], Sequence[str]]) -> bool:
        return path.is_dir() and (path / "anns").is_dir()

    @classmethod
    def layout_problem(cls, path: Path, split: str) -> tuple[str, list[str]] | None:
        """(what is wrong, the other splits under ``anns/``) when ``anns/<split>`` holds no annotation file."""
        annotations = path / "anns" / split
        if annotations.is_dir() and any(annotations.glob("*.json")):
            return None
        anns = path / "anns"
        splits = sorted(p.name for p in anns.iterdir() if p.is_dir() and p != annotations) if anns.is_dir() else []
        return f"has no anns/{split}/*.json", splits

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
