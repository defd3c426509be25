"""Layout metrics on labelled boxes: COCO mAP@[.5:.95] and label-agnostic area precision / recall / F1.

Boxes live on the DocTags location grid: ``<loc_x0><loc_y0><loc_x1><loc_y1>`` with integers 0..500, top-left
origin (doctags.document_boxes produces them). Both metrics follow docling-eval's LayoutEvaluator
(``docling_eval/evaluators/layout_evaluator.py``):

- ``coco_map`` reimplements pycocotools' COCOeval for one image and ``iouType="bbox"`` (what docling-eval runs
  through torchmetrics' MeanAveragePrecision): per label, detections in score order (all 1.0 here: DocTags carry
  no confidence, as in docling-eval), greedy matching to the unmatched ground truth of highest IoU at each of the ten
  IoU thresholds .50:.05:.95, at most 100 detections per label, precision made monotone and read at 101 recall
  points. Labels without ground truth are left out of the mean; a label with ground truth but no detection scores 0.
  A detection with negative area (one inverted side) is ignored, as COCOeval's area range does.
  Differences: docling-eval's per-page ``map_val`` is really mAP@.5 and its dataset mAP pools all pages and only the
  labels present in both ground truth and predictions of the whole dataset; here every page gets its own
  mAP@[.5:.95] over the labels of its ground truth.
- ``area_precision_recall_f1`` rasterises the union of the reference boxes and of the predicted boxes and compares
  the covered areas (docling-eval ``_compute_area_level_metrics_for_tensors``). docling-eval draws on a 512x512
  mask of a page scaled to 100 with truncation; here the mask is the 500x500 location grid itself, so integer
  boxes are measured exactly.

Usage::

    coco_map(reference_boxes, predicted_boxes)                  # float in [0, 1], None without reference boxes
    area_precision_recall_f1(reference_boxes, predicted_boxes)  # (precision, recall, f1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

LOC_GRID = 500
"""DocTags coordinates run from 0 to this value on both axes."""

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100
"""COCO's largest maxDets, the one its headline AP uses; applied per label and page."""


class LabelledBox(NamedTuple):
    """One layout element: its docling label and its box (x0, y0) top-left, (x1, y1) bottom-right."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``boxes_a`` (N, 4) with every box in ``boxes_b`` (M, 4), as (N, M).

    Like pycocotools' bbox IoU: no +1 on widths, and a degenerate or inverted box overlaps nothing.
    """
    x0 = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    y0 = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    x1 = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    y1 = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = _areas(boxes_a)[:, None] + _areas(boxes_b)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def match_detections(ious: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy COCO matching for one label and IoU threshold; ``ious`` is (detections, ground truths) in score order.

    Each detection takes the still-unmatched ground truth with the highest IoU >= threshold (the later one on a
    tie, as COCOeval.evaluateImg does). Returns a bool (detections,) array: True where the detection is a hit.
    """
    num_detections, num_truths = ious.shape
    taken = np.zeros(num_truths, dtype=bool)
    hits = np.zeros(num_detections, dtype=bool)
    for d in range(num_detections):
        best_iou = min(threshold, 1 - 1e-10)
        best = -1
        for g in range(num_truths):
            if taken[g] or ious[d, g] < best_iou:
                continue
            best_iou, best = ious[d, g], g
        if best >= 0:
            taken[best] = True
            hits[d] = True
    return hits


def interpolated_precision(hits: np.ndarray, num_truths: int) -> float:
    """COCO's 101-point interpolated average precision for one label at one IoU threshold.

    ``hits`` marks the detections, in score order, that matched a ground truth.
    """
    if len(hits) == 0:
        return 0.0
    true_positives = np.cumsum(hits)
    recall = true_positives / num_truths
    precision = true_positives / np.arange(1, len(hits) + 1)
    # The precision envelope: best precision at this recall or any higher one.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    indices = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(indices < len(precision), precision[np.minimum(indices, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def coco_map(
    reference: Sequence[LabelledBox],
    prediction: Sequence[LabelledBox],
    scores: Sequence[float] | None = None,
) -> float | None:
    """mAP@[.5:.95] of one page, COCO style (see the module docstring); None when the reference has no boxes.

    ``scores`` rank the predictions (higher first, stable); without them every prediction scores 1.0, which keeps
    the given order.
    """
    if not reference:
        return None
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable") if scores is not None else None
    ranked = [prediction[i] for i in order] if order is not None else list(prediction)
    per_label = []
    for label in sorted({box.label for box in reference}):
        truths = _coords([box for box in reference if box.label == label])
        detections = _coords([box for box in ranked if box.label == label][:MAX_DETECTIONS])
        # COCOeval's area range [0, inf) ignores a detection of negative area (one side inverted); it can never
        # match anyway, so ignoring means it is not even a false positive.
        detections = detections[_areas(detections) >= 0]
        ious = iou_matrix(detections, truths)
        per_label.append([interpolated_precision(match_detections(ious, t), len(truths)) for t in IOU_THRESHOLDS])
    return float(np.mean(per_label))


def area_precision_recall_f1(
    reference: Sequence[LabelledBox], prediction: Sequence[LabelledBox]
) -> tuple[float, float, float]:
    """Label-agnostic coverage: precision = |pred ∩ ref| / |pred|, recall = |pred ∩ ref| / |ref| over the areas
    covered by the union of each side's boxes.

    Edge cases as docling-eval: no reference boxes gives (1, 1, 1) for no predictions and (0, 1, 0) otherwise;
    no predicted boxes against some reference gives (1, 0, 0).
    """
    if not reference:
        return (1.0, 1.0, 1.0) if not prediction else (0.0, 1.0, 0.0)
    if not prediction:
        return 1.0, 0.0, 0.0
    reference_mask = coverage_mask(reference)
    prediction_mask = coverage_mask(prediction)
    overlap = int(np.logical_and(reference_mask, prediction_mask).sum())
    predicted_area = int(prediction_mask.sum())
    reference_area = int(reference_mask.sum())
    precision = overlap / predicted_area if predicted_area else 0.0
    recall = overlap / reference_area if reference_area else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def coverage_mask(boxes: Sequence[LabelledBox], grid: int = LOC_GRID) -> np.ndarray:
    """Boolean (grid, grid) mask, [y, x], of the cells covered by any box; boxes are clipped to the page."""
    mask = np.zeros((grid, grid), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = (int(np.clip(round(v), 0, grid)) for v in (box.x0, box.y0, box.x1, box.y1))
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    return mask


def _areas(coords: np.ndarray) -> np.ndarray:
    return (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])


def _coords(boxes: Sequence[LabelledBox]) -> np.ndarray:
    return np.array([[box.x0, box.y0, box.x1, box.y1] for box in boxes], dtype=float).reshape(-1, 4)
