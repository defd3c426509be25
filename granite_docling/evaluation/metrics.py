"""The metrics, as one registry (:data:`METRICS`), the per-sample scoring and the ``metrics.json`` aggregation.

Each :class:`Metric` names its function, its direction, whether it is a headline metric, whether metrics.png
draws it and whether training logs it; scores.jsonl, metrics.json, report.md, report.html, the comparison and
the training eval all list the metrics from :data:`METRICS`, in its order. Adding a metric is one function of
an :class:`AnswerContext` (the answer and its reference read once, with the work metrics share: docling-core
documents, Markdown text metrics, tables, layout boxes) and one entry in :data:`METRICS`.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

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

OVERALL_KEY = "overall"
SOURCES_KEY = "sources"

Scores = dict[str, Any]


class Headline(NamedTuple):
    """How a headline metric is shown: a card in report.html and a ``before -> after`` line of a comparison."""

    label: str  # the comparison line's name for it ("edit distance")
    number: str  # the format of a value: "{:.3f}", or a share "{:.0%}" (its change is then said in points)


@dataclass(frozen=True)
class Metric:
    """One metric: its name (the key in scores.jsonl and metrics.json), how one answer scores, how it is shown."""

    name: str
    score: Callable[[AnswerContext], float | None]  # None: the metric does not apply to this sample
    lower_is_better: bool = False
    headline: Headline | None = None  # None: not a headline metric
    plotted: bool = True  # drawn in metrics.png (the parts and health counts after ``map`` are not)
    logged_in_training: bool = False  # logged as ``gen/<name>`` by the training loop's generation eval

    @property
    def arrow(self) -> str:
        """The direction mark the reports put after the name: ↓ lower is better, ↑ higher is better."""
        return "↓" if self.lower_is_better else "↑"


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            "edit_distance",
            lambda answer: answer.text["edit_distance"],
            lower_is_better=True,
            headline=Headline("edit distance", "{:.3f}"),
            logged_in_training=True,
        ),
        Metric("precision", lambda answer: answer.text["precision"]),
        Metric("recall", lambda answer: answer.text["recall"]),
        Metric("f1", lambda answer: answer.text["f1"], headline=Headline("F1", "{:.3f}"), logged_in_training=True),
        Metric("bleu", lambda answer: answer.text["bleu"], logged_in_training=True),
        Metric("meteor", lambda answer: answer.text["meteor"], logged_in_training=True),
        Metric("exact_match", lambda answer: exact_match(answer.prediction, answer.reference), logged_in_training=True),
        Metric("teds", lambda answer: answer.teds(structure_only=False), logged_in_training=True),
        Metric("teds_struct", lambda answer: answer.teds(structure_only=True)),
        Metric("map", lambda answer: answer.layout_map(), logged_in_training=True),
        Metric("doctags_valid", lambda answer: answer.health.get("doctags_valid"), logged_in_training=True),
        Metric("layout_precision", lambda answer: answer.layout_coverage.get("layout_precision"), plotted=False),
        Metric("layout_recall", lambda answer: answer.layout_coverage.get("layout_recall"), plotted=False),
        Metric("layout_f1", lambda answer: answer.layout_coverage.get("layout_f1"), plotted=False),
        Metric(
            "doctags_parses",
            lambda answer: answer.health.get("doctags_parses"),
            headline=Headline("DocTags that parse", "{:.0%}"),
            plotted=False,
        ),
        Metric("doctags_closed", lambda answer: answer.health.get("doctags_closed"), plotted=False),
        Metric(
            "stopped_with_eos",
            lambda answer: float(answer.stopped),
            headline=Headline("stopped with eos", "{:.0%}"),
            plotted=False,
            logged_in_training=True,
        ),
        Metric(
            "loops",
            lambda answer: float(answer.loop_rule is not None),
            lower_is_better=True,
            headline=Headline("answers that loop", "{:.0%}"),
            plotted=False,
            logged_in_training=True,
        ),
    )
}
"""Every metric, in the order scores.jsonl, metrics.json and the reports list them. A new metric: a function of an
AnswerContext returning a float (None where it does not apply) and one entry here, where its row should go."""


def score_sample(
    prediction: str,
    reference: str,
    *,
    page_image: Image.Image | None = None,
    stopped: bool | None = None,
) -> Scores:
    """Score one model answer against its ground truth: every metric of :data:`METRICS`, then ``kind``,
    ``n_tables`` and ``loop_rule`` (see the module docstring).

    ``prediction`` may be the raw decoded generation: it is cut at the first ``<|end_of_text|>``. ``stopped`` says
    whether generation ended with eos; left None, it is read from the prediction (so pass the raw decode with
    special tokens kept, or pass the flag). ``page_image`` is handed to docling-core as docling-eval does, but no
    score depends on it and docling-core PNG-encodes it (~0.3 s per page and document): None is the fast choice.
    Raises ValueError when docling-core cannot parse the reference.
    """
    answer = AnswerContext.read(prediction, reference, page_image, stopped)
    scores: Scores = {name: metric.score(answer) for name, metric in METRICS.items()}
    scores["kind"] = answer.kind
    scores["n_tables"] = len(answer.tables[0]) if answer.tables is not None else 0
    scores["loop_rule"] = answer.loop_rule
    return scores


@dataclass
class AnswerContext:
    """One answer and its reference, read once, and the work several metrics share (each computed on first use)."""

    prediction: str  # the answer, cut at eos
    reference: str  # the ground truth, cut at eos
    kind: str  # "page": a full-page conversion, scored on its Markdown; "short": scored on the raw text
    stopped: bool  # generation ended with eos
    reference_doc: DoclingDocument | None  # None: the reference holds no DocTags
    prediction_doc: DoclingDocument | None  # None: no DocTags reference, or docling-core cannot read the answer

    @classmethod
    def read(
        cls, prediction: str, reference: str, page_image: Image.Image | None = None, stopped: bool | None = None
    ) -> AnswerContext:
        """Cut both texts at eos and convert DocTags through docling-core (ValueError: the reference fails)."""
        prediction, saw_eos = split_at_eos(prediction)
        reference, _ = split_at_eos(reference)
        kind = "page" if is_page_answer(reference) else "short"
        is_doctags = kind == "page" or contains_doctags(reference)
        reference_doc = doctags_to_document(reference, page_image, "reference") if is_doctags else None
        prediction_doc = try_doctags_to_document(prediction, page_image, "prediction") if is_doctags else None
        return cls(
            prediction=prediction,
            reference=reference,
            kind=kind,
            stopped=saw_eos if stopped is None else stopped,
            reference_doc=reference_doc,
            prediction_doc=prediction_doc,
        )

    @cached_property
    def text(self) -> dict[str, float]:
        """text_metrics of the answer: on the documents' Markdown for a page, on the raw text otherwise."""
        if self.kind == "page":
            assert self.reference_doc is not None
            predicted = document_markdown(self.prediction_doc) if self.prediction_doc is not None else ""
            return text_metrics(predicted, document_markdown(self.reference_doc))
        return text_metrics(self.prediction, self.reference)

    @cached_property
    def loop_rule(self) -> str | None:
        """The loop rule the answer ends in (loops.py), None when it does not loop."""
        return loops(self.prediction)

    @cached_property
    def tables(self) -> tuple[list, list] | None:
        """(reference tables, predicted tables); None when the reference holds no DocTags."""
        if self.reference_doc is None:
            return None
        predicted = document_tables(self.prediction_doc) if self.prediction_doc is not None else []
        return document_tables(self.reference_doc), predicted

    def teds(self, structure_only: bool) -> float | None:
        """Mean TEDS of the tables paired in order (teds.py); None without reference tables."""
        return None if self.tables is None else paired_teds(*self.tables, structure_only=structure_only)

    @cached_property
    def boxes(self) -> tuple[list, list] | None:
        """(reference boxes, predicted boxes); None when the reference has no located element."""
        reference_boxes = document_boxes(self.reference_doc) if self.reference_doc is not None else []
        if not reference_boxes:
            return None
        return reference_boxes, document_boxes(self.prediction_doc) if self.prediction_doc is not None else []

    def layout_map(self) -> float | None:
        """COCO mAP@[.5:.95] of the predicted boxes (layout.py); None when the reference has no boxes."""
        return None if self.boxes is None else coco_map(*self.boxes)

    @cached_property
    def layout_coverage(self) -> dict[str, float]:
        """``layout_precision, layout_recall, layout_f1`` (area coverage); empty when the reference has no boxes."""
        if self.boxes is None:
            return {}
        precision, recall, f1 = area_precision_recall_f1(*self.boxes)
        return {"layout_precision": precision, "layout_recall": recall, "layout_f1": f1}

    @cached_property
    def health(self) -> dict[str, float]:
        """``doctags_parses, doctags_closed, doctags_valid``; empty when the reference holds no DocTags."""
        if self.reference_doc is None:
            return {}
        # docling-core recovers from almost anything (even an empty string): the prediction must also be DocTags.
        # The answer must also close what the prompt opened (a formula crop's answer ends in </formula>).
        parses = self.prediction_doc is not None and contains_doctags(self.prediction)
        closed = is_well_formed(self.prediction, opened_by_prompt(self.reference))
        return {
            "doctags_parses": float(parses),
            "doctags_closed": float(closed),
            "doctags_valid": float(parses and closed),
        }


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
    metric_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The metrics.json structure from per-sample score dicts grouped as ``{dataset: {source: [scores, ...]}}``.

    Keys: ``overall`` and one per dataset, each a ``summarize`` block plus ``sources`` -> {source: block}. The
    overall per-source blocks pool a source name across datasets. ``metric_names``: every metric of
    :data:`METRICS` unless given.
    """
    if OVERALL_KEY in grouped:
        raise ValueError(f"a dataset may not be called {OVERALL_KEY!r}: that key holds the totals in metrics.json")
    names = list(METRICS) if metric_names is None else metric_names
    report: dict[str, Any] = {OVERALL_KEY: _group_summary(_merge_sources(grouped.values()), names)}
    for dataset, by_source in grouped.items():
        report[dataset] = _group_summary(by_source, names)
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
