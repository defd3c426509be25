"""``granite-docling validate PATH... [--json]``: check every sample before spending GPU hours on it.

For each dataset: JSON and schema, empty answers, image paths inside the root, every image fully decoded, and
the token length with the real processor (image tokens included), then a report: samples, good, bad by reason
with file names, turns and images per sample, token-length percentiles, tiles.

Exit status: 0 when every sample is good, 1 when some are bad, 2 when a path is not a dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.lengths import LengthCounter
from granite_docling.data.sample import REASONS, Problem, Sample
from granite_docling.data.sources import ReadOptions, open_source

log = logging.getLogger(__name__)


def count_tokens(processor, sample: Sample, image_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """(tokens, tiles) the processor would give this sample, from its images' (width, height), no pixel resized."""
    return LengthCounter(processor).count_one(sample, image_sizes, ImageSpec.from_processor(processor))


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))])

    return {"min": float(ordered[0]), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": float(ordered[-1])}


def validate_dataset(path: Path, processor, split: str = "train", max_length: int | None = None) -> dict:
    """Check every sample of one dataset; a JSON-ready report."""
    source = open_source(path, path.name, ReadOptions(split=split))
    lengths = []
    tiles = []
    turns = []
    images = []
    problems = []
    good = 0
    counter = LengthCounter(processor)
    spec = ImageSpec.from_processor(processor)
    for index, sample in source.records():  # one record at a time: any size of dataset
        if isinstance(sample, Problem):
            problems.append(sample)
            continue
        try:
            sizes = [decode_image(ref).size for ref in sample.images]  # (width, height)
        except ImageError as error:
            problems.append(Problem(sample.dataset, sample.id, error.reason, error.detail))
            continue
        length, n_tiles = counter.count_one(sample, sizes, spec)
        if max_length is not None and length > max_length:
            problems.append(Problem(sample.dataset, sample.id, "too_long", f"{length} > {max_length} tokens"))
            continue
        good += 1
        lengths.append(length)
        tiles.append(n_tiles)
        turns.append(len(sample.turns))
        images.append(len(sample.images))
        if (index + 1) % 200 == 0:
            log.info("%s: %d / %d samples checked", path, index + 1, len(source))
    by_reason = Counter(p.reason for p in problems)
    return {
        "path": str(path),
        "samples": good + len(problems),
        "good": good,
        "bad": len(problems),
        "bad_by_reason": dict(by_reason.most_common()),
        "problems": [{"file": p.file, "reason": p.reason, "detail": p.detail} for p in problems],
        "turns_per_sample": percentiles(turns),
        "images_per_sample": percentiles(images),
        "tokens": percentiles(lengths),
        "tiles_per_sample": percentiles(tiles),
        "tiles_total": sum(tiles),
    }


def format_report(report: dict) -> str:
    lines = [f"{report['path']}: {report['samples']} samples, {report['good']} good, {report['bad']} bad"]
    for reason, n in report["bad_by_reason"].items():
        files = [p["file"] for p in report["problems"] if p["reason"] == reason]
        shown = ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")
        lines.append(f"  {n} x {reason}: {REASONS.get(reason, '')}\n      {shown}")
    for key, label in (
        ("turns_per_sample", "turns / sample"),
        ("images_per_sample", "images / sample"),
        ("tokens", "tokens / sample"),
        ("tiles_per_sample", "tiles / sample"),
    ):
        stats = report[key]
        if stats:
            lines.append(f"  {label:16s} " + "  ".join(f"{k} {v:g}" for k, v in stats.items()))
    if report["good"]:
        lines.append(f"  tiles in total: {report['tiles_total']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="dataset folders or parquet files")
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list for several paths)")
    parser.add_argument("--split", default="train", help="split to check (default: train)")
    parser.add_argument("--checkpoint", default=None, help="processor to count tokens with (default: the vendored one)")
    parser.add_argument("--max-length", type=int, default=None, help="report samples longer than this as bad")


def run(args: argparse.Namespace) -> int:
    from granite_docling.model import ASSETS_DIR, stock_processor

    processor = stock_processor(args.checkpoint or str(ASSETS_DIR))  # a folder that is no model: one line
    reports = [validate_dataset(path, processor, args.split, args.max_length) for path in args.paths]
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 1 if any(r["bad"] for r in reports) else 0
