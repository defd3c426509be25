"""Per-sample scoring of a model answer and the ``metrics.json`` aggregation.

``score_sample(prediction, reference)`` decides the kind of sample from the reference: a full-page conversion
(the reference opens with ``<doctag>``) is converted through docling-core and scored on its Markdown, tables and
layout, the way docling-eval scores a page; anything else (formula, code, other short answers) is scored on the
raw text, plus exact match. Metrics that do not apply to a sample are None.

Per-sample keys (all floats or None, plus ``kind`` and ``loop_rule``):
- text: ``edit_distance, precision, recall, f1, bleu, meteor`` (text_metrics.py), ``exact_match``;
- tables: ``teds, teds_struct`` (teds.py; when the reference has OTSL tables), ``n_tables`` (reference tables);
- layout: ``map`` (COCO mAP@[.5:.95]) and ``layout_precision, layout_recall, layout_f1`` (area coverage;
  layout.py; when the reference has located elements);
- health: ``doctags_parses`` (docling-core accepts the prediction), ``doctags_closed`` (every opened tag closed,
  and those the prompt opened: a formula crop's ``</formula>``),
  ``doctags_valid`` (both; for DocTags references only) and ``stopped_with_eos`` (generation ended with eos
  rather than at max_new_tokens);
- loops: ``loops`` (1.0 when the answer ends in a loop by docling's rules, loops.py; every sample), with
  ``loop_rule`` naming the rule (``repeated_blocks`` or ``repeated_tail``; None when it does not loop). The mean of
  ``loops`` in metrics.json is the share of answers that loop.

``aggregate_metrics({dataset: {source: [sample dicts]}})`` gives the ``metrics.json`` structure::

    {"overall": {"n": 12, "edit_distance": {"mean": .., "median": .., "n": 12}, ..., "sources": {...}},
     "<dataset>": {... same ..., "sources": {"<source>": {... same, without "sources" ...}}}}

where a metric that applies to no sample of a group has ``{"mean": null, "median": null, "n": 0}``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from docling_core.types.doc.document import DoclingDocument
from PIL import Image

from granite_docling.evaluation.doctags import (
    contains_doctags,
    doctags_to_document,
    document_boxes,
    document_markdown,
    document_tables,
    is_page_answer,
    is_well_formed,
    opened_by_prompt,
    split_at_eos,
    try_doctags_to_document,
)
from granite_docling.evaluation.layout import area_precision_recall_f1, coco_map
from granite_docling.evaluation.loops import loops
from granite_docling.evaluation.teds import paired_teds
from granite_docling.evaluation.text_metrics import exact_match, text_metrics

_log = logging.getLogger(__name__)

REPORTED_METRICS = (
    "edit_distance",
    "precision",
    "recall",
    "f1",
    "bleu",
    "meteor",
    "exact_match",
    "teds",
    "teds_struct",
    "map",
    "doctags_valid",
)
"""The metrics every metrics.json group reports."""

EXTRA_METRICS = (
    "layout_precision",
    "layout_recall",
    "layout_f1",
    "doctags_parses",
    "doctags_closed",
    "stopped_with_eos",
    "loops",
)
"""Reported after REPORTED_METRICS: the parts behind doctags_valid, layout coverage, eos stops and loops."""

OVERALL_KEY = "overall"
SOURCES_KEY = "sources"

Scores = dict[str, Any]


def score_sample(
    prediction: str,
    reference: str,
    *,
    page_image: Image.Image | None = None,
    stopped: bool | None = None,
) -> Scores:
    """Score one model answer against its ground truth; see the module docstring for the keys.

    ``prediction`` may be the raw decoded generation: it is cut at the first ``<|end_of_text|>``. ``stopped`` says
    whether generation ended with eos; left None, it is read from the prediction (so pass the raw decode with
    special tokens kept, or pass the flag). ``page_image`` is handed to docling-core as docling-eval does, but no
    score depends on it and docling-core PNG-encodes it (~0.3 s per page and document): None is the fast choice.
    Raises ValueError when docling-core cannot parse the reference.
    """
    prediction, saw_eos = split_at_eos(prediction)
    reference, _ = split_at_eos(reference)
    kind = "page" if is_page_answer(reference) else "short"
    scores: Scores = dict.fromkeys((*REPORTED_METRICS, *EXTRA_METRICS))
    scores["kind"] = kind
    scores["n_tables"] = 0
    scores["stopped_with_eos"] = float(saw_eos if stopped is None else stopped)
    scores["loop_rule"] = loops(prediction)
    scores["loops"] = float(scores["loop_rule"] is not None)
    scores["exact_match"] = exact_match(prediction, reference)

    is_doctags = kind == "page" or contains_doctags(reference)
    reference_doc = doctags_to_document(reference, page_image, "reference") if is_doctags else None
    prediction_doc = try_doctags_to_document(prediction, page_image, "prediction") if is_doctags else None

    if kind == "page":
        assert reference_doc is not None
        predicted_markdown = document_markdown(prediction_doc) if prediction_doc is not None else ""
        scores.update(text_metrics(predicted_markdown, document_markdown(reference_doc)))
    else:
        scores.update(text_metrics(prediction, reference))

    if reference_doc is not None:
        scores.update(_table_scores(reference_doc, prediction_doc))
        scores.update(_layout_scores(reference_doc, prediction_doc))
        scores.update(_health_scores(prediction, prediction_doc, opened_by_prompt(reference)))
    return scores


def summarize(samples: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> dict[str, Any]:
    """``{"n": len(samples), name: {"mean", "median", "n"}}`` over the samples where each metric is not None."""
    summary: dict[str, Any] = {"n": len(samples)}
    for name in metric_names:
        values = [float(sample[name]) for sample in samples if sample.get(name) is not None]
        summary[name] = {
            "mean": statistics.fmean(values) if values else None,
            "median": float(statistics.median(values)) if values else None,
            "n": len(values),
        }
    return summary


def aggregate_metrics(
    grouped: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    metric_names: Sequence[str] = (*REPORTED_METRICS, *EXTRA_METRICS),
) -> dict[str, Any]:
    """The metrics.json structure from per-sample score dicts grouped as ``{dataset: {source: [scores, ...]}}``.

    Keys: ``overall`` and one per dataset, each a ``summarize`` block plus ``sources`` -> {source: block}. The
    overall per-source blocks pool a source name across datasets.
    """
    if OVERALL_KEY in grouped:
        raise ValueError(f"a dataset may not be called {OVERALL_KEY!r}: that key holds the totals in metrics.json")
    report: dict[str, Any] = {OVERALL_KEY: _group_summary(_merge_sources(grouped.values()), metric_names)}
    for dataset, by_source in grouped.items():
        report[dataset] = _group_summary(by_source, metric_names)
    return report


def _group_summary(by_source: Mapping[str, Sequence[Mapping[str, Any]]], metric_names: Sequence[str]) -> dict[str, Any]:
    samples = [sample for source_samples in by_source.values() for sample in source_samples]
    summary = summarize(samples, metric_names)
    summary[SOURCES_KEY] = {source: summarize(list(items), metric_names) for source, items in by_source.items()}
    return summary


def _merge_sources(
    groups: Iterable[Mapping[str, Sequence[Mapping[str, Any]]]],
) -> dict[str, list[Mapping[str, Any]]]:
    merged: dict[str, list[Mapping[str, Any]]] = {}
    for by_source in groups:
        for source, samples in by_source.items():
            merged.setdefault(source, []).extend(samples)
    return merged


def _table_scores(reference: DoclingDocument, prediction: DoclingDocument | None) -> Scores:
    reference_tables = document_tables(reference)
    predicted_tables = document_tables(prediction) if prediction is not None else []
    return {
        "n_tables": len(reference_tables),
        "teds": paired_teds(reference_tables, predicted_tables),
        "teds_struct": paired_teds(reference_tables, predicted_tables, structure_only=True),
    }


def _layout_scores(reference: DoclingDocument, prediction: DoclingDocument | None) -> Scores:
    reference_boxes = document_boxes(reference)
    if not reference_boxes:
        return {}
    predicted_boxes = document_boxes(prediction) if prediction is not None else []
    precision, recall, f1 = area_precision_recall_f1(reference_boxes, predicted_boxes)
    return {
        "map": coco_map(reference_boxes, predicted_boxes),
        "layout_precision": precision,
        "layout_recall": recall,
        "layout_f1": f1,
    }


def _health_scores(prediction: str, prediction_doc: DoclingDocument | None, opened: list[str]) -> Scores:
    # docling-core recovers from almost anything (even an empty string): the prediction must also be DocTags.
    # ``opened``: what the prompt opened, which the answer must close (a formula crop's answer ends in </formula>).
    parses = prediction_doc is not None and contains_doctags(prediction)
    closed = is_well_formed(prediction, opened)
    return {
        "doctags_parses": float(parses),
        "doctags_closed": float(closed),
        "doctags_valid": float(parses and closed),
    }
