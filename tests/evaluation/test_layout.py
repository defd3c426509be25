"""Layout metrics on a few boxes: COCO mAP@[.5:.95] and label-agnostic area precision / recall / F1."""

import numpy as np
import pytest

from granite_docling.evaluation.layout import (
    LabelledBox,
    area_precision_recall_f1,
    coco_map,
    interpolated_precision,
    iou_matrix,
)

TEXT = LabelledBox("text", 0, 0, 100, 100)
TABLE = LabelledBox("table", 200, 200, 300, 300)


def test_iou_of_boxes():
    boxes = np.array([[0, 0, 100, 100], [0, 0, 100, 72], [50, 0, 150, 100], [10, 10, 5, 5]], dtype=float)
    ious = iou_matrix(boxes, boxes[:1])
    assert ious[:, 0].tolist() == pytest.approx([1.0, 0.72, 50 / 150, 0.0])


def test_perfect_prediction_scores_one():
    assert coco_map([TEXT, TABLE], [TABLE, TEXT]) == 1.0


def test_a_shifted_box_counts_at_the_iou_thresholds_it_clears():
    # IoU 0.72 clears 0.50, 0.55, 0.60, 0.65, 0.70 and misses 0.75 .. 0.95: AP 1 at five thresholds of ten.
    assert coco_map([TEXT], [LabelledBox("text", 0, 0, 100, 72)]) == 0.5


def test_a_wrong_label_scores_zero():
    assert coco_map([TEXT], [LabelledBox("table", *TEXT[1:])]) == 0.0


def test_labels_are_averaged_and_labels_without_ground_truth_ignored():
    assert coco_map([TEXT, TABLE], [TEXT]) == 0.5  # table has ground truth but no detection
    assert coco_map([TEXT], [TEXT, LabelledBox("picture", 0, 0, 10, 10)]) == 1.0


def test_a_false_positive_ranked_first_halves_precision():
    miss = LabelledBox("text", 300, 300, 400, 400)
    # Detections [miss, hit]: precision 0 then 1/2 at recall 1; the envelope reads 1/2 at every recall point.
    assert coco_map([TEXT], [miss, TEXT]) == pytest.approx(0.5)
    assert coco_map([TEXT], [miss, TEXT], scores=[0.1, 0.9]) == 1.0


def test_one_detection_cannot_match_two_ground_truths():
    duplicate = LabelledBox("text", 0, 0, 100, 100)
    # One hit out of two ground truths: precision 1 up to recall 0.5, nothing after: 51 of 101 recall points.
    assert coco_map([TEXT, duplicate], [TEXT]) == pytest.approx(51 / 101)


def test_interpolated_precision_reads_101_recall_points():
    assert interpolated_precision(np.array([True, False, True]), num_truths=2) == pytest.approx(
        (51 * 1.0 + 50 * 2 / 3) / 101
    )
    assert interpolated_precision(np.array([], dtype=bool), num_truths=3) == 0.0


def test_inverted_detections_are_ignored_not_false_positives():
    inverted = LabelledBox("text", 50, 100, 150, 0)  # negative area, as COCOeval's area range ignores
    assert coco_map([TEXT], [inverted, TEXT]) == 1.0


def test_no_reference_boxes_means_map_does_not_apply():
    assert coco_map([], [TEXT]) is None


def test_area_metrics_compare_covered_areas():
    half_off = LabelledBox("table", 50, 0, 150, 100)  # labels do not matter here
    assert area_precision_recall_f1([TEXT], [half_off]) == (0.5, 0.5, 0.5)
    # Overlapping predictions are counted once (union of boxes).
    assert area_precision_recall_f1([TEXT], [TEXT, LabelledBox("text", 0, 0, 50, 50)]) == (1.0, 1.0, 1.0)
    precision, recall, f1 = area_precision_recall_f1([TEXT, TABLE], [TEXT])
    assert (precision, recall, f1) == (1.0, 0.5, pytest.approx(2 / 3))


def test_area_metrics_edge_cases_follow_docling_eval():
    assert area_precision_recall_f1([], []) == (1.0, 1.0, 1.0)
    assert area_precision_recall_f1([], [TEXT]) == (0.0, 1.0, 0.0)
    assert area_precision_recall_f1([TEXT], []) == (1.0, 0.0, 0.0)


def test_area_metrics_clip_boxes_to_the_page():
    beyond = LabelledBox("text", 400, 400, 600, 600)
    assert area_precision_recall_f1([LabelledBox("text", 400, 400, 500, 500)], [beyond]) == (1.0, 1.0, 1.0)
