"""What one evaluation is, in memory and on disk: its records (predictions.jsonl), where its files are
(:class:`Outputs`), and the comparison of two evaluations' metrics that :mod:`report` and :mod:`html_report` both
read.

    records = read_predictions(Path("outputs/eval/predictions.jsonl"), image_roots=["data/sample"])

A predictions file may come from anyone, and the images it names end up in report.html's ``report_files/``: they
are read only from inside the file's own folder and the folders of the datasets being evaluated.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from granite_docling.data.images import ImageError, resolve_inside
from granite_docling.evaluation.metrics import METRICS, Scores
from granite_docling.user_error import UserError

log = logging.getLogger(__name__)

UNKNOWN_SOURCE = "unknown"


@dataclass
class Record:
    """One evaluated sample: a line of predictions.jsonl."""

    id: str
    dataset: str
    source: str | None
    prompt: str  # the chat-template prompt, with one <image> placeholder per image
    prediction: str  # the answer up to eos, special tokens kept
    reference: str
    stopped: bool | None  # generation ended with eos before max_new_tokens; None = read eos from the prediction
    images: list[str] = field(default_factory=list)  # image files; '' for images stored inline (parquet bytes)
    new_tokens: int | None = None  # tokens generated, eos included
    max_new_tokens: int | None = None  # the budget this answer had (see eval.reference_length_factor)
    loop_stopped: str | None = None  # the loop rule that stopped generation early (eval.stop_loops), else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        if not isinstance(data, Mapping):
            raise ValueError(f"a predictions line is a JSON {type(data).__name__}, not an object")
        missing = {"id", "dataset", "prediction", "reference"} - set(data)
        if missing:
            raise ValueError(f"a predictions line lacks {sorted(missing)}: is this a predictions.jsonl?")
        for key in ("prediction", "reference"):
            if not isinstance(data[key], str):
                raise ValueError(f"{key!r} is a JSON {type(data[key]).__name__}, not a string")
        images = data.get("images") or []
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise ValueError(f"'images' must be a list of file paths, not {json.dumps(images)[:80]}")
        return cls(
            id=str(data["id"]),
            dataset=str(data["dataset"]),
            source=data.get("source"),
            prompt=data.get("prompt", ""),
            prediction=data["prediction"],
            reference=data["reference"],
            stopped=data.get("stopped"),
            images=list(images),
            new_tokens=data.get("new_tokens"),
            max_new_tokens=data.get("max_new_tokens"),
            loop_stopped=None if data.get("loop_stopped") is None else str(data["loop_stopped"]),
        )


class PredictionsFileError(UserError, ValueError):
    """A predictions file that cannot be read as one: the message names the file (and line) and what is wrong."""


def read_predictions(path: Path, image_roots: Sequence[str | Path] = ()) -> list[Record]:
    """The records of a predictions.jsonl. The images they name are kept only where they lie inside the file's
    folder or one of ``image_roots`` (the datasets being evaluated; hub ids and missing paths are skipped); any
    other path becomes '' (not read, as for an image stored inline), and one warning says how many and how to
    show them."""
    path = Path(path)
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(Record.from_dict(json.loads(line)))
                    except ValueError as error:  # json.JSONDecodeError is one
                        raise PredictionsFileError(f"{path}:{number}: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise PredictionsFileError(f"cannot read {path}: {error}") from error
    if not records:
        raise PredictionsFileError(f"{path} holds no predictions")
    roots = [Path(root) for root in (path.parent, *image_roots) if root and Path(root).exists()]
    roots = [root if root.is_dir() else root.parent for root in roots]  # a parquet file's folder
    refused = []
    for record in records:
        allowed = [image if not image or _inside_any(image, roots) else "" for image in record.images]
        refused += [image for image, kept in zip(record.images, allowed, strict=True) if image and not kept]
        record.images = allowed
    if refused:
        log.warning(
            "%s names %d image(s) outside its folder and the folders of this evaluation's datasets, not read "
            "(first: %r); to show them, evaluate with the dataset they belong to: dataset=[NAME] "
            "dataset.NAME.path=FOLDER",
            path,
            len(refused),
            refused[0][:200],
        )
    return records


def _inside_any(image: str, roots: Sequence[Path]) -> bool:
    for root in roots:
        try:
            resolve_inside(root, str(Path(image).absolute()))  # relative paths are the evaluation's, from the cwd
            return True
        except (ImageError, OSError, ValueError, RuntimeError):  # outside, or a path that cannot be resolved
            continue
    return False


def write_predictions(path: Path, records: Sequence[Record]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")


@dataclass
class Outputs:
    """Where one evaluation's files are."""

    folder: Path
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    samples: set[tuple[str, str]] = field(default_factory=set)  # (dataset, id) of every record
    title: str = ""
    checkpoint: str | None = None  # what was evaluated: a model folder, hub id or predictions file
    records: list[Record] = field(default_factory=list)
    scores: list[Scores | None] = field(default_factory=list)
    examples: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)  # shown record -> its images


def safe_name(name: str) -> str:
    """A file-system-safe folder name for a dataset or sample id ('anns/train/x.json' -> 'anns_train_x')."""
    return re.sub(r"[^\w.-]+", "_", name.removesuffix(".json")).strip("._") or "sample"


def compare_metrics(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """``{group: {metric: {"before", "after", "delta", "better"}}}`` for the groups both evaluations have.

    ``delta = after - before`` of the means, for every metric of METRICS; ``better`` is True when the change is an
    improvement (for a metric where lower is better, a decrease), None when either side is missing or nothing changed.
    """
    comparison: dict[str, Any] = {}
    for group in (g for g in after if g in before):
        rows: dict[str, Any] = {"n": {"before": before[group]["n"], "after": after[group]["n"]}}
        for name, metric in METRICS.items():
            a = after[group].get(name, {}).get("mean")
            b = before[group].get(name, {}).get("mean")
            delta = None if a is None or b is None else a - b
            better = None if not delta else (delta < 0) == metric.lower_is_better
            rows[name] = {"before": b, "after": a, "delta": delta, "better": better}
        comparison[group] = rows
    return comparison
