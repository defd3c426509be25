"""Everything an evaluation leaves in its run folder, from prediction records and their scores.

    predictions.jsonl   one line per sample: id, dataset, source, prompt, prediction, reference, stopped, images,
                        new_tokens, max_new_tokens, loop_stopped
    scores.jsonl        the per-sample scores of metrics.py, keyed by dataset and id (loop_rule: how it loops)
    metrics.json        aggregate_metrics: "overall" and one block per dataset (n; {mean, median, n} per metric;
                        the mean of "loops" is the share of answers that loop)
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
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.sample import ImageRef
from granite_docling.evaluation.doctags import is_page_answer
from granite_docling.evaluation.export import export_answer
from granite_docling.evaluation.html_report import FILES_DIR, write_thumbnails
from granite_docling.evaluation.metrics import METRICS, OVERALL_KEY, Scores, aggregate_metrics, score_sample
from granite_docling.evaluation.records import (
    UNKNOWN_SOURCE,
    Outputs,
    Record,
    safe_name,
    write_predictions,
)

log = logging.getLogger(__name__)


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
    training run's loss curve; the page itself is written by :func:`html_report.write_report_page` once every
    side of the evaluation is known.

    7 parameters: where, what and its title, then the report's options (examples shown, page exports, images,
    the checkpoint evaluated), each with a default.
    """
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
    for name, metric in METRICS.items():
        if any(name in metrics[g] for g in groups):
            cells = [_format(metrics[g].get(name, {}).get(statistic)) for g in groups]
            lines.append(f"| {name} {metric.arrow} | " + " | ".join(cells) + " |")
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


def comparison_report(comparison: Mapping[str, Any], after_name: str, before_name: str) -> str:
    """comparison.md: one table per group, before | after | delta."""
    parts = [f"# Comparison\n\nafter = `{after_name}`, before = `{before_name}`; delta = after - before.\n"]
    for group, rows in comparison.items():
        parts += [
            f"\n## {group} (n = {rows['n']['after']})\n\n",
            "| metric | before | after | delta | |\n",
            "|---|---|---|---|---|\n",
        ]
        for name, metric in METRICS.items():
            row = rows[name]
            if row["before"] is None and row["after"] is None:
                continue
            mark = {True: "better", False: "worse", None: ""}[row["better"]]
            delta = "–" if row["delta"] is None else f"{row['delta']:+.4f}"
            parts.append(
                f"| {name} {metric.arrow} | {_format(row['before'])} | {_format(row['after'])} | {delta} | {mark} |\n"
            )
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Plot


def plot_metrics(evaluations: Mapping[str, Mapping[str, Any]], path: Path, group: str | None = None) -> Path:
    """Horizontal bars of the mean of each plotted metric (``Metric.plotted``).

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
    plotted = [name for name, metric in METRICS.items() if metric.plotted]
    names = [n for n in plotted if any(block.get(n, {}).get("mean") is not None for block in series.values())]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(1, len(names)) * max(2, len(series)) / 2 + 1.5))
    height = 0.8 / max(1, len(series))
    for i, (label, block) in enumerate(series.items()):
        values = [block.get(n, {}).get("mean") or 0.0 for n in names]
        positions = [k + i * height for k in range(len(names))]
        ax.barh(positions, values, height=height, label=f"{label} (n={block['n']})")
    ax.set_yticks([k + height * (len(series) - 1) / 2 for k in range(len(names))])
    ax.set_yticklabels([f"{n} {METRICS[n].arrow}" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean over samples")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(series)), fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
