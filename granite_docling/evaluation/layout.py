"""Layout metrics on labelled boxes: COCO mAP@[.5:.95] and label-agnostic area precision / recall / F1.

Boxes live on the DocTags location grid: ``<loc_x0><loc_y0><loc_x1><loc_y1>`` with integers 0..500, top-left
origin (doctags.document_boxes produces them). Both metrics follow docling-eval's LayoutEvaluator
(``docling_eval/evaluators/layout_evaluator.py``):

- ``coco_map`` is pycocotools' COCOeval for one image and ``iouType="bbox"`` (what docling-eval runs through
  torchmetrics' MeanAveragePrecision), computed by faster-coco-eval's C++ port of it: per label, detections in
  score order (all 1.0 here: DocTags carry no confidence, as in docling-eval), greedy matching to the unmatched
  ground truth of highest IoU at each of the ten IoU thresholds .50:.05:.95, at most 100 detections per label,
  precision made monotone and read at 101 recall points. Labels without ground truth are left out of the mean; a
  label with ground truth but no detection scores 0. A box of negative area (one inverted side) is ignored, as
  COCOeval's area range does: such a detection is not even a false positive, such a reference box not a miss.
  faster-coco-eval and pycocotools agree on random pages to 1e-16; pycocotools is not used because it prints to
  stdout and is the slowest: 19 ms on a 150-box page, against 2.2 ms for faster-coco-eval and 9 ms for this
  module's former NumPy version (2.3, 0.8 and 1.2 ms on a 32-box page).
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

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

_log = logging.getLogger(__name__)

LOC_GRID = 500
"""DocTags coordinates run from 0 to this value on both axes."""

MAX_DETECTIONS = 100
"""COCO's largest maxDets, the one its headline AP uses; applied per label and page."""
_ALL_AREAS = [[0.0, 1e10]]
"""COCOeval's "all" area range, the only one scored: boxes of negative area fall outside it and are ignored."""


class LabelledBox(NamedTuple):
    """One layout element: its docling label and its box (x0, y0) top-left, (x1, y1) bottom-right."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float


def coco_map(
    reference: Sequence[LabelledBox],
    prediction: Sequence[LabelledBox],
    scores: Sequence[float] | None = None,
) -> float | None:
    """mAP@[.5:.95] of one page, COCO style (see the module docstring); None when the reference has no boxes
    (or only inverted ones).

    ``scores`` rank the predictions (higher first, stable); without them every prediction scores 1.0, which keeps
    the given order.
    """
    if not reference:
        return None
    scores = [1.0] * len(prediction) if scores is None else scores
    category = {label: index for index, label in enumerate(sorted({box.label for box in (*reference, *prediction)}), 1)}
    ground_truth = COCO(
        {
            "images": [{"id": 1}],
            "categories": [{"id": index} for index in category.values()],
            # Ids from 1: COCOeval records a match by the ground truth's id, and 0 means "unmatched".
            "annotations": [
                {
                    "id": i,
                    "image_id": 1,
                    "category_id": category[box.label],
                    "bbox": _xywh(box),
                    "area": _area(box),
                    "iscrowd": 0,
                }
                for i, box in enumerate(reference, 1)
            ],
        }
    )
    detections = ground_truth.loadRes(
        [
            {"image_id": 1, "category_id": category[box.label], "bbox": _xywh(box), "score": float(score)}
            for box, score in zip(prediction, scores, strict=True)
        ]
    )
    evaluator = COCOeval_faster(ground_truth, detections, "bbox", print_function=_log.debug)
    evaluator.params.areaRng = _ALL_AREAS
    evaluator.params.areaRngLbl = ["all"]
    evaluator.params.maxDets = [MAX_DETECTIONS]
    evaluator.evaluate()
    evaluator.accumulate()
    # (IoU thresholds, recall points, labels, area ranges, max detections); -1 for a label without ground truth.
    precision = evaluator.eval["precision"]
    scored = precision[precision > -1]
    return float(scored.mean()) if scored.size else None


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


def _xywh(box: LabelledBox) -> list[float]:
    return [box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0]


def _area(box: LabelledBox) -> float:
    return (box.x1 - box.x0) * (box.y1 - box.y0)
