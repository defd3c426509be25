"""The one sample type every reader produces, and the record of a sample that had to be skipped.

Everything downstream of the readers (tokenisation, batching, validation, evaluation) knows only these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from granite_docling.user_error import UserError

# An image is a file path (decoded lazily, in a loader worker) or the encoded bytes of a parquet / hub row.
ImageRef = Union[Path, bytes]

# Why a sample was skipped: the keys are what `validate`, the run's bad_samples.jsonl and the summaries report.
REASONS = {
    "invalid_json": "the annotation file is unreadable or not valid JSON",
    "bad_schema": "the annotation does not have the expected fields and types",
    "empty_answer": "an assistant answer is empty",
    "missing_image": "an image file does not exist",
    "bad_image_path": "an image path names no file that can be opened (a folder, a symlink loop, a NUL byte, too long)",
    "unreadable_image": "an image is truncated, damaged or cannot be decoded",
    "image_too_large": "an image has more pixels than allowed (decompression-bomb guard)",
    "path_outside_root": "an image or annotation path resolves outside the dataset folder (refused)",
    "too_long": "the sample is longer than data.max_length tokens, image tokens included",
    "bad_document": "the ground-truth DoclingDocument (docling-eval's GroundTruthDocument) does not parse",
    "missing_page_image": "a page of the document has no page image",
    "unreadable_rows": "the rows cannot be read from their parquet file (damaged data pages)",
}


@dataclass(frozen=True)
class Turn:
    """One question and its answer. ``source`` is the origin tag the datasets carry (e.g. 'DoclingMatix')."""

    user: str
    assistant: str
    source: str | None = None


@dataclass(frozen=True)
class Sample:
    """Images plus a conversation; all images belong to the first user turn."""

    id: str  # unique within its dataset; the annotation file relative to the root, or 'file.parquet#row'
    dataset: str  # the dataset's display name
    images: tuple[ImageRef, ...]
    turns: tuple[Turn, ...]
    root: Path | None = field(default=None, compare=False)  # folder that image paths must stay inside

    @property
    def source(self) -> str | None:
        return self.turns[0].source if self.turns else None


@dataclass(frozen=True)
class Problem:
    """A sample that was skipped: where it came from and why (a key of :data:`REASONS`)."""

    dataset: str
    file: str  # relative to the dataset root where there is one
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"dataset": self.dataset, "file": self.file, "reason": self.reason, "detail": self.detail}


class BadSampleError(UserError, RuntimeError):
    """Raised with ``data.on_bad_sample=error`` at the first bad sample; names the file and the reason."""

    def __init__(self, problem: Problem):
        self.problem = problem
        detail = f" ({problem.detail})" if problem.detail else ""
        super().__init__(
            f"bad sample in dataset {problem.dataset!r}: {problem.file}: {problem.reason}{detail}. "
            "Fix or remove it, or set data.on_bad_sample=skip to skip and report bad samples."
        )
