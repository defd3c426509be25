"""Layout metrics on a few boxes: COCO mAP@[.5:.95] and label-agnostic area precision / recall / F1; and
faster-coco-eval's COCOeval against a small COCO reference written here."""

import random

import numpy as np
import pytest

from granite_docling.evaluation.layout import LabelledBox, area_precision_recall_f1, coco_map

TEXT = LabelledBox("text", 0, 0, 100, 100)
TABLE = LabelledBox("table", 200, 200, 300, 300)


def reference_coco_map(reference, prediction, scores):
    """COCOeval's bbox AP for one image, written out: per label, stable score order, at most 100 detections,
    greedy matching (ties go to the later ground truth), 101-point interpolated precision; boxes of negative area
    ignored."""

    def area(b):
        return (b.x1 - b.x0) * (b.y1 - b.y0)

    def iou(a, b):
        inter = max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
        union = area(a) + area(b) - inter
        return inter / union if union > 0 else 0.0

    ranked = [prediction[i] for i in sorted(range(len(prediction)), key=lambda i: -scores[i])]
    per_label = []
    for label in sorted({b.label for b in reference if area(b) >= 0}):
        truths = [b for b in reference if b.label == label and area(b) >= 0]
        detections = [b for b in ranked if b.label == label][:100]
        detections = [b for b in detections if area(b) >= 0]
        for threshold in np.linspace(0.5, 0.95, 10):
            taken, hits = set(), []
            for d in detections:
                best, best_iou = None, min(threshold, 1 - 1e-10)
                for g, truth in enumerate(truths):
                    if g not in taken and iou(d, truth) >= best_iou:
                        best, best_iou = g, iou(d, truth)
                taken |= {best} - {None}
                hits.append(best is not None)
            tp = np.cumsum(hits)
            recall, precision = tp / len(truths), tp / np.arange(1, len(hits) + 1)
            precision = np.maximum.accumulate(precision[::-1])[::-1] if len(hits) else precision
            points = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
            per_label.append(np.mean([precision[i] if i < len(hits) else 0.0 for i in points]))
    return float(np.mean(per_label)) if per_label else None


def test_coco_map_matches_the_reference_on_random_pages():
    labels = ["text", "table", "picture", "section_header"]
    rng = random.Random(0)

    def box(label=None, smallest=1):
        x0, y0 = rng.randint(0, 450), rng.randint(0, 450)
        return LabelledBox(label or rng.choice(labels), x0, y0, x0 + rng.randint(smallest, 60), y0 + rng.randint(1, 60))

    def moved(b):
        return LabelledBox(
            b.label if rng.random() > 0.1 else rng.choice(labels), *(v + rng.randint(-4, 4) for v in b[1:])
        )

    for trial in range(100):
        reference = [box() for _ in range(rng.randint(1, 25))]
        prediction = [moved(b) for b in reference if rng.random() > 0.2] + [box(smallest=-5) for _ in range(3)]
        if trial % 10 == 0:
            prediction += [moved(reference[0]) for _ in range(110)]  # past the 100 detections COCO keeps
        rng.shuffle(prediction)
        scores = [rng.choice([0.5, 0.7, 1.0]) for _ in prediction]  # ties: the stable order decides
        assert coco_map(reference, prediction, scores) == pytest.approx(
            reference_coco_map(reference, prediction, scores), abs=1e-12
        )


def test_iou_thresholds_of_boxes():
    # IoU 0.72 clears five of the ten thresholds; 50/150 and a box inverted on both sides (positive area, no
    # overlap) clear none.
    for predicted, expected in [((0, 0, 100, 72), 0.5), ((50, 0, 150, 100), 0.0), ((10, 10, 5, 5), 0.0)]:
        assert coco_map([TEXT], [LabelledBox("text", *predicted)]) == expected


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
    miss = LabelledBox("text", 300, 300, 400, 400)
    # Hit, miss, hit on two ground truths: precision 1 up to recall 0.5 (51 points), then 2/3 (50 points).
    assert coco_map([TEXT, TABLE._replace(label="text")], [TEXT, miss, TABLE._replace(label="text")]) == (
        pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    )
    assert coco_map([TEXT], []) == 0.0


def test_inverted_boxes_are_ignored_not_false_positives_or_misses():
    inverted = LabelledBox("text", 50, 100, 150, 0)  # negative area, as COCOeval's area range ignores
    assert coco_map([TEXT], [inverted, TEXT]) == 1.0
    assert coco_map([TEXT, inverted], [TEXT]) == 1.0
    assert coco_map([inverted], [TEXT]) is None  # no reference box left to score


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
