"""Everything an evaluation leaves in its run folder, from prediction records and their scores.

    predictions.jsonl   one line per sample: id, dataset, source, prompt, prediction, reference, stopped, images,
                        new_tokens, max_new_tokens
    scores.jsonl        the per-sample scores of metrics.py, keyed by dataset and id
    metrics.json        aggregate_metrics: "overall" and one block per dataset (n; {mean, median, n} per metric)
    report.md           the metric tables (means and medians)
    metrics.png         mean of each metric, per dataset
    report.html         the evaluation on one page (html_report.py): metrics, the training loss curve, and a few
                        samples side by side (page image | reference | prediction, rendered, and their diff);
                        report_files/ holds its images
    pages/              docling-core Markdown / HTML / DocTags of every page conversion, prediction and reference

and, for ``compare_to``, ``comparison.json`` / ``comparison.md`` / ``comparison.png`` with the deltas (and
report.html shows before -> after).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.sample import ImageRef
from granite_docling.evaluation.doctags import is_page_answer
from granite_docling.evaluation.export import export_answer
from granite_docling.evaluation.metrics import (
    EXTRA_METRICS,
    OVERALL_KEY,
    REPORTED_METRICS,
    Scores,
    aggregate_metrics,
    score_sample,
)

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"edit_distance"})
TABLE_METRICS = (*REPORTED_METRICS, *EXTRA_METRICS)
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        missing = {"id", "dataset", "prediction", "reference"} - set(data)
        if missing:
            raise ValueError(f"a predictions line lacks {sorted(missing)}: is this a predictions.jsonl?")
        return cls(
            id=str(data["id"]),
            dataset=str(data["dataset"]),
            source=data.get("source"),
            prompt=data.get("prompt", ""),
            prediction=data["prediction"],
            reference=data["reference"],
            stopped=data.get("stopped"),
            images=list(data.get("images") or []),
            new_tokens=data.get("new_tokens"),
            max_new_tokens=data.get("max_new_tokens"),
        )


def read_predictions(path: Path) -> list[Record]:
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(Record.from_dict(json.loads(line)))
                except (json.JSONDecodeError, ValueError) as error:
                    raise ValueError(f"{path}:{number}: {error}") from error
    if not records:
        raise ValueError(f"{path} holds no predictions")
    return records


def write_predictions(path: Path, records: Sequence[Record]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")


def score_records(records: Sequence[Record]) -> list[Scores | None]:
    """score_sample for every record; None (and a warning) where docling-core cannot read the reference."""
    scores: list[Scores | None] = []
    for record in records:
        try:
            scores.append(score_sample(record.prediction, record.reference, stopped=record.stopped))
        except ValueError as error:
            log.warning("%s/%s not scored: %s", record.dataset, record.id, error)
            scores.append(None)
    return scores


def group_scores(records: Sequence[Record], scores: Sequence[Scores | None]) -> dict[str, dict[str, list[Scores]]]:
    grouped: dict[str, dict[str, list[Scores]]] = {}
    for record, score in zip(records, scores, strict=True):
        if score is not None:
            grouped.setdefault(record.dataset, {}).setdefault(record.source or UNKNOWN_SOURCE, []).append(score)
    return grouped


# ---------------------------------------------------------------------------------------------------------------
# The run folder


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


def write_outputs(
    folder: Path,
    records: Sequence[Record],
    title: str,
    num_examples: int = 6,
    page_exports: bool = True,
    image_refs: Mapping[tuple[str, str], Sequence[ImageRef]] | None = None,
    checkpoint: str | None = None,
) -> Outputs:
    """Score ``records`` and write every file listed in the module docstring into ``folder``.

    ``image_refs`` maps (dataset, id) to the sample's images (paths or bytes); without it the image files named
    in the records are used where they exist. ``checkpoint`` (what was evaluated) leads report.html to the
    training run's loss curve.
    """
    from granite_docling.evaluation.html_report import FILES_DIR, write_report_page, write_thumbnails

    folder.mkdir(parents=True, exist_ok=True)
    scores = score_records(records)
    metrics = aggregate_metrics(group_scores(records, scores))
    files = {
        "predictions": folder / "predictions.jsonl",
        "scores": folder / "scores.jsonl",
        "metrics": folder / "metrics.json",
        "report": folder / "report.md",
        "plot": folder / "metrics.png",
    }
    write_predictions(files["predictions"], records)
    with files["scores"].open("w", encoding="utf-8") as f:
        for record, score in zip(records, scores, strict=True):
            f.write(json.dumps({"dataset": record.dataset, "id": record.id, "scores": score}) + "\n")
    files["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    files["report"].write_text(metrics_report(metrics, title))
    plot_metrics({title: metrics}, files["plot"])

    def images_of(record: Record) -> list[Image.Image | None]:
        return record_images(record, image_refs)

    if page_exports:
        pages = folder / "pages"
        n = 0
        for record in records:
            if is_page_answer(record.reference):
                images = images_of(record)
                target = pages / safe_name(record.dataset) / safe_name(record.id)
                export_answer(target / "prediction", "prediction", record.prediction, images)
                export_answer(target / "reference", "reference", record.reference, images)
                n += 1
        if n:
            files["pages"] = pages
    shutil.rmtree(folder / FILES_DIR, ignore_errors=True)  # the images of an earlier page in this folder
    examples = {
        i: write_thumbnails(folder, f"{i:04d}_{safe_name(r.id)}", images_of(r))
        for i, r in pick_examples(records, num_examples)
    }
    outputs = Outputs(
        folder=folder,
        metrics=metrics,
        files=files,
        samples={(r.dataset, r.id) for r in records},
        title=title,
        checkpoint=checkpoint,
        records=list(records),
        scores=scores,
        examples=examples,
    )
    files["page"] = write_report_page(outputs)
    return outputs


def record_images(
    record: Record, image_refs: Mapping[tuple[str, str], Sequence[ImageRef]] | None
) -> list[Image.Image | None]:
    """The record's images, decoded (None for one that cannot be): from ``image_refs`` (the samples read this run),
    else the image files the record names."""
    refs = (image_refs or {}).get((record.dataset, record.id))
    if refs is None:
        refs = [Path(p) for p in record.images if p]
    return [_try_decode(ref) for ref in refs]


def _try_decode(ref: ImageRef) -> Image.Image | None:
    try:
        return decode_image(ref)
    except ImageError as error:
        log.debug("image not shown: %s", error)
        return None


def safe_name(name: str) -> str:
    """A file-system-safe folder name for a dataset or sample id ('anns/train/x.json' -> 'anns_train_x')."""
    return re.sub(r"[^\w.-]+", "_", name.removesuffix(".json")).strip("._") or "sample"


def pick_examples(records: Sequence[Record], n: int) -> list[tuple[int, Record]]:
    """Up to ``n`` records, taken in turn from each dataset and source so that every one shows."""
    by_dataset: dict[tuple[str, str | None], list[tuple[int, Record]]] = {}
    for index, record in enumerate(records):
        by_dataset.setdefault((record.dataset, record.source), []).append((index, record))
    chosen: list[tuple[int, Record]] = []
    queues = [list(items) for items in by_dataset.values()]
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return sorted(chosen, key=lambda item: item[0])


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def metrics_table(metrics: Mapping[str, Any], statistic: str = "mean") -> str:
    """A Markdown table: one row per metric, one column per group (overall first)."""
    groups = list(metrics)
    lines = [
        "| metric | " + " | ".join(groups) + " |",
        "|---" * (len(groups) + 1) + "|",
        "| samples | " + " | ".join(str(metrics[g]["n"]) for g in groups) + " |",
    ]
    for name in TABLE_METRICS:
        if any(name in metrics[g] for g in groups):
            cells = [_format(metrics[g].get(name, {}).get(statistic)) for g in groups]
            arrow = "↓" if name in LOWER_IS_BETTER else "↑"
            lines.append(f"| {name} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metrics_report(metrics: Mapping[str, Any], title: str) -> str:
    """report.md: means, medians, and means per source within each dataset."""
    parts = [
        f"# Evaluation: {title}\n",
        "## Means\n",
        metrics_table(metrics, "mean"),
        "\n## Medians\n",
        metrics_table(metrics, "median"),
    ]
    for dataset, block in metrics.items():
        if dataset != OVERALL_KEY and len(block.get("sources", {})) > 1:
            parts += [f"\n## {dataset}: means per source\n", metrics_table(block["sources"], "mean")]
    parts.append("\n↑ higher is better, ↓ lower is better; – = the metric applies to no sample of the group.\n")
    return "".join(parts)


def compare_metrics(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """``{group: {metric: {"before", "after", "delta", "better"}}}`` for the groups both evaluations have.

    ``delta = after - before`` of the means; ``better`` is True when the change is an improvement (for
    edit_distance, a decrease), None when either side is missing or nothing changed.
    """
    comparison: dict[str, Any] = {}
    for group in (g for g in after if g in before):
        rows: dict[str, Any] = {"n": {"before": before[group]["n"], "after": after[group]["n"]}}
        for name in TABLE_METRICS:
            a = after[group].get(name, {}).get("mean")
            b = before[group].get(name, {}).get("mean")
            delta = None if a is None or b is None else a - b
            better = None if not delta else (delta < 0) == (name in LOWER_IS_BETTER)
            rows[name] = {"before": b, "after": a, "delta": delta, "better": better}
        comparison[group] = rows
    return comparison


def comparison_report(comparison: Mapping[str, Any], after_name: str, before_name: str) -> str:
    """comparison.md: one table per group, before | after | delta."""
    parts = [f"# Comparison\n\nafter = `{after_name}`, before = `{before_name}`; delta = after - before.\n"]
    for group, rows in comparison.items():
        parts += [
            f"\n## {group} (n = {rows['n']['after']})\n\n",
            "| metric | before | after | delta | |\n",
            "|---|---|---|---|---|\n",
        ]
        for name in TABLE_METRICS:
            row = rows[name]
            if row["before"] is None and row["after"] is None:
                continue
            mark = {True: "better", False: "worse", None: ""}[row["better"]]
            delta = "–" if row["delta"] is None else f"{row['delta']:+.4f}"
            arrow = "↓" if name in LOWER_IS_BETTER else "↑"
            parts.append(
                f"| {name} {arrow} | {_format(row['before'])} | {_format(row['after'])} | {delta} | {mark} |\n"
            )
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Plot


def plot_metrics(evaluations: Mapping[str, Mapping[str, Any]], path: Path, group: str | None = None) -> Path:
    """Horizontal bars of the mean of each reported metric.

    One evaluation: one bar per group (overall and each dataset). Several (a comparison): one bar per
    evaluation, for ``group`` (default overall).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(evaluations) == 1:
        [metrics] = evaluations.values()
        series = {g: metrics[g] for g in metrics}
    else:
        series = {name: metrics[group or OVERALL_KEY] for name, metrics in evaluations.items()}
    names = [n for n in REPORTED_METRICS if any(block.get(n, {}).get("mean") is not None for block in series.values())]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(1, len(names)) * max(2, len(series)) / 2 + 1.5))
    height = 0.8 / max(1, len(series))
    for i, (label, block) in enumerate(series.items()):
        values = [block.get(n, {}).get("mean") or 0.0 for n in names]
        positions = [k + i * height for k in range(len(names))]
        ax.barh(positions, values, height=height, label=f"{label} (n={block['n']})")
    ax.set_yticks([k + height * (len(series) - 1) / 2 for k in range(len(names))])
    ax.set_yticklabels([f"{n} {'↓' if n in LOWER_IS_BETTER else '↑'}" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean over samples")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(series)), fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
