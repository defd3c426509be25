"""What every dataset format shares: the :class:`Source` interface a format implements, the read options, the two
errors, and the parsing of ``{user, assistant, source}`` turns. The formats themselves are the other modules of
this package; :mod:`granite_docling.data.formats` lists them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granite_docling.data.sample import Problem, Sample, Turn
from granite_docling.user_error import UserError


class DatasetNotFoundError(UserError, ValueError):
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


def limit(sample: Sample, options: ReadOptions) -> Sample:
    """Keep the first ``max_turns`` turns and the first ``max_images_per_sample`` images."""
    turns = sample.turns[: options.max_turns] if options.max_turns else sample.turns
    images = sample.images[: options.max_images_per_sample] if options.max_images_per_sample else sample.images
    return Sample(id=sample.id, dataset=sample.dataset, images=images, turns=turns, root=sample.root)


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
# The interface of a format


class Source:
    """One dataset's records: ``len`` of them, each read by locator. A format subclasses it and says where its
    records live, how its data is recognised (:meth:`detect`), what makes a path of it unusable before anything
    is read (:meth:`layout_problem`) and whether it streams (``streams``). A format's class is opened as
    ``cls(path, name, options, cache_dir)``."""

    format_name: str = ""  # the value of dataset.<name>.format that selects it
    streams: bool = False  # dataset.<name>.streaming=true reads it as a stream (granite_docling.data.streaming)
    not_streamed: str = "this format is indexed, not streamed"  # said when streaming is asked of it

    name: str
    options: ReadOptions

    @classmethod
    def detect(cls, path: Path, columns: Callable[[], Sequence[str]]) -> bool:
        """Whether ``path`` holds data of this format. Looks at names on disk; ``columns()`` (the column names of
        parquet / Arrow data or a hub id, read on first call) only for formats told apart by their columns."""
        return False

    @classmethod
    def layout_problem(cls, path: Path, split: str) -> str | None:
        """What makes the existing local ``path`` unusable for ``split``, checked before anything is loaded (by
        pre-flight and on opening the source); None when nothing is seen to be wrong."""
        return None

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
