import math

import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from cmdfed.evaluate.metrics import (
    aggregate_panoptic,
    aji,
    aji_plus,
    dice,
    dice2,
    evaluate_instances,
    pair_centroids,
    panoptic_quality,
    summarize,
)

nan = float("nan")


def row(*segments: tuple[int, int, int], length: int = 40) -> np.ndarray:
    """A 1 x length instance map; each segment is (id, first column, last column)."""
    instance_map = np.zeros((1, length), dtype=np.int32)
    for instance_id, first, last in segments:
        instance_map[0, first : last + 1] = instance_id
    return instance_map


# G: columns 0-9 (10 px). B: 0-3 (4 px, inside G). A: 4-33 (30 px, 6 px inside G).
# IoU(G, B) = 4/10 = 0.4 beats IoU(G, A) = 6/34, although A has the larger intersection.
IOU_VS_INTERSECTION_GT = row((1, 0, 9))
IOU_VS_INTERSECTION_PRED = row((2, 0, 3), (3, 4, 33))


def test_aji_pairs_by_iou_not_by_intersection():
    # IoU pairing: G-B, C = 4, U = |G u B| = 10 + unused A 30 = 40 -> 0.1.
    # (Pairing by intersection would take A: 6 / (34 + unused B 4) = 6/38.)
    assert aji(IOU_VS_INTERSECTION_GT, IOU_VS_INTERSECTION_PRED) == pytest.approx(0.1)
    assert aji_plus(IOU_VS_INTERSECTION_GT, IOU_VS_INTERSECTION_PRED) == pytest.approx(0.1)


def test_cellseg_metrics_aji_differs_on_the_same_case():
    cellseg_metrics = pytest.importorskip("cellseg_metrics")
    theirs = cellseg_metrics.aggregated_jaccard_index(IOU_VS_INTERSECTION_GT, IOU_VS_INTERSECTION_PRED)
    assert theirs == pytest.approx(6 / 38)


def test_two_truths_merged_into_one_prediction():
    gt = row((1, 0, 4), (2, 5, 9))
    pred = row((7, 0, 9))
    # AJI: both truths pair with P (IoU 0.5 each); P counts in the union twice:
    # C = 5 + 5, U = 10 + 10 -> 0.5.
    assert aji(gt, pred) == pytest.approx(0.5)
    # AJI+: P pairs once (with truth 1, first of the tie); truth 2 is unpaired:
    # C = 5, U = 10 + 5 -> 1/3.
    assert aji_plus(gt, pred) == pytest.approx(1 / 3)
    # PQ: IoU 0.5 is not > 0.5, so nothing matches: tp 0, fp 1, fn 2.
    counts = panoptic_quality(gt, pred)
    assert (counts.tp, counts.fp, counts.fn) == (0, 1, 2)
    assert (counts.dq, counts.sq, counts.pq) == (0.0, 0.0, 0.0)
    assert dice(gt, pred) == 1.0
    # Dice 2: pairs (1, P) and (2, P) each intersect 5 with |G| + |P| = 15 -> 20/30.
    assert dice2(gt, pred) == pytest.approx(2 / 3)


def test_one_truth_split_into_two_predictions():
    gt = row((1, 0, 9))
    pred = row((4, 0, 6), (9, 7, 9))
    # AJI and AJI+: G pairs with the 7-px part (IoU 0.7); the 3-px part is unpaired:
    # C = 7, U = 10 + 3 -> 7/13.
    assert aji(gt, pred) == pytest.approx(7 / 13)
    assert aji_plus(gt, pred) == pytest.approx(7 / 13)
    # PQ: one match at IoU 0.7, one false positive: DQ = 1 / 1.5, SQ = 0.7.
    counts = panoptic_quality(gt, pred)
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 0)
    assert counts.dq == pytest.approx(2 / 3)
    assert counts.sq == pytest.approx(0.7)
    assert counts.pq == pytest.approx(0.7 * 2 / 3)
    assert dice2(gt, pred) == pytest.approx(20 / 30)  # (2*7 + 2*3) / (17 + 13)


# Non-contiguous ids in both maps.
GT_6X6 = np.array(
    [
        [3, 3, 3, 0, 0, 0],
        [3, 3, 3, 0, 0, 0],
        [0, 0, 0, 0, 70, 70],
        [0, 0, 0, 0, 70, 70],
        [0, 0, 0, 0, 0, 0],
        [9, 9, 0, 0, 0, 0],
    ]
)
PRED_6X6 = np.array(
    [
        [5, 5, 0, 0, 0, 0],
        [5, 5, 5, 0, 0, 0],
        [0, 0, 0, 0, 8, 8],
        [0, 0, 0, 0, 8, 8],
        [0, 0, 0, 0, 8, 8],
        [0, 0, 0, 0, 2, 2],
    ]
)
# Pixel types; one pixel of truth 3 disagrees, the majority (type 1) wins.
GT_TYPE_6X6 = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 2, 0, 0, 0],
        [0, 0, 0, 0, 2, 2],
        [0, 0, 0, 0, 2, 2],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
    ]
)
PRED_TYPE_6X6 = np.where(np.isin(PRED_6X6, [5, 8]), 1, 0) + np.where(PRED_6X6 == 2, 2, 0)


def test_hand_worked_6x6_without_types():
    result = evaluate_instances(GT_6X6, PRED_6X6, match_radius=3)
    # Overlaps: (3, 5): 5 px, IoU 5/6. (70, 8): 4 px, IoU 4/6. Truth 9 and prediction 2
    # overlap nothing.
    assert (result["gt_count"], result["pred_count"]) == (3, 3)
    # Foreground 12 vs 13 px, 9 shared -> 18/25.
    assert result["dice"] == pytest.approx(18 / 25)
    # Dice 2 over the two overlapping pairs: 2 * (5 + 4) / ((6 + 5) + (4 + 6)).
    assert result["dice2"] == pytest.approx(18 / 21)
    # AJI = (5 + 4) / (|3 u 5| 6 + |70 u 8| 6 + truth 9: 2 + prediction 2: 2) = 9/16.
    assert result["aji"] == pytest.approx(9 / 16)
    assert result["aji_plus"] == pytest.approx(9 / 16)
    # PQ: tp 2, fp 1, fn 1: DQ = 2/3, SQ = (5/6 + 4/6) / 2 = 3/4, PQ = 1/2.
    assert (result["tp"], result["fp"], result["fn"]) == (2, 1, 1)
    assert result["iou_sum"] == pytest.approx(1.5)
    assert result["dq"] == pytest.approx(2 / 3)
    assert result["sq"] == pytest.approx(0.75)
    assert result["pq"] == pytest.approx(0.5)
    # Centroids (x, y): 3 (1, 0.5) ~ 5 (0.8, 0.6); 70 (4.5, 2.5) ~ 8 (4.5, 3);
    # 9 (0.5, 5) and 2 (4.5, 5) are 4 px apart, beyond the radius of 3.
    assert (result["det_tp"], result["det_fp"], result["det_fn"]) == (2, 1, 1)
    assert result["det_f1"] == pytest.approx(2 / 3)
    assert "per_type" not in result
    # With the default 12 px radius, 9 and 2 pair up too.
    assert evaluate_instances(GT_6X6, PRED_6X6)["det_f1"] == 1.0


def test_hand_worked_6x6_with_types():
    result = evaluate_instances(GT_6X6, PRED_6X6, GT_TYPE_6X6, PRED_TYPE_6X6, match_radius=3)
    # Types: truth 3 -> 1, 70 -> 2, 9 -> 1; prediction 5 -> 1, 8 -> 1, 2 -> 2.
    type_1, type_2 = result["per_type"][1], result["per_type"][2]
    # Type 1: truths {3, 9}, predictions {5, 8}; only (3, 5) matches (IoU 5/6).
    assert (type_1["tp"], type_1["fp"], type_1["fn"]) == (1, 1, 1)
    assert type_1["pq"] == pytest.approx(0.5 * 5 / 6)
    # Type 2: truth {70}, prediction {2}: no match.
    assert (type_2["tp"], type_2["fp"], type_2["fn"]) == (0, 1, 1)
    assert type_2["pq"] == 0.0
    assert result["mpq"] == pytest.approx((5 / 12 + 0) / 2)
    # Detection pairs (3, 5): types 1/1, (70, 8): types 2/1; unpaired truth 9 (type 1)
    # and prediction 2 (type 2).
    assert result["type_agree"] == 1
    assert {key: type_1[key] for key in ("cls_tp", "cls_fp", "cls_fn", "det_fp", "det_fn")} == {
        "cls_tp": 1,
        "cls_fp": 1,
        "cls_fn": 0,
        "det_fp": 0,
        "det_fn": 1,
    }
    assert {key: type_2[key] for key in ("cls_tp", "cls_fp", "cls_fn", "det_fp", "det_fn")} == {
        "cls_tp": 0,
        "cls_fp": 0,
        "cls_fn": 1,
        "det_fp": 1,
        "det_fn": 0,
    }


def test_type_present_only_in_prediction_has_nan_pq_and_is_left_out_of_mpq():
    gt = row((1, 0, 9))
    result = evaluate_instances(gt, gt, np.where(gt > 0, 1, 0), np.where(gt > 0, 3, 0))
    assert math.isnan(result["per_type"][3]["pq"]) and result["per_type"][3]["fp"] == 1
    assert result["per_type"][1]["pq"] == 0.0 and result["per_type"][1]["fn"] == 1
    assert result["mpq"] == 0.0


def test_summarize_pools_counts_and_averages_per_image_values():
    typed = evaluate_instances(GT_6X6, PRED_6X6, GT_TYPE_6X6, PRED_TYPE_6X6, match_radius=3)
    lone_prediction = row((6, 0, 1), length=6)
    no_type = np.zeros((1, 6), dtype=int)
    no_truth = evaluate_instances(no_type, lone_prediction, no_type, np.sign(lone_prediction))
    summary = summarize([typed, no_truth])
    assert summary["images"] == 2
    assert summary["mean_pq"] == pytest.approx(0.5)  # the image without truth is NaN, skipped
    assert summary["mean_aji"] == pytest.approx((9 / 16 + 0) / 2)
    # Pooled: tp 2, fp 1 + 1, fn 1: DQ = 2 / 3.5, SQ = 0.75.
    assert summary["pooled_dq"] == pytest.approx(2 / 3.5)
    assert summary["pooled_pq"] == pytest.approx(0.75 * 2 / 3.5)
    assert summary["pooled_det_f1"] == pytest.approx(4 / 7)  # 2*2 / (4 + 2 + 1)
    assert summary["type_accuracy"] == pytest.approx(0.5)
    type_1 = summary["per_type"][1]
    assert type_1["mean_pq"] == pytest.approx(5 / 12)  # PanNuke: mean over images with type 1
    # Pooled type 1: tp 1, fp 2, fn 1 -> DQ 1/2.5, SQ 5/6.
    assert type_1["pooled_pq"] == pytest.approx(5 / 6 / 2.5)
    # Classification F1: cls_tp 1, cls_fp 1, det_fp 1 (second image), det_fn 1.
    assert type_1["f1"] == pytest.approx(2 / (2 + 2 + 1 + 1))
    assert summary["per_type"][2]["f1"] == 0.0
    assert summary["mpq_plus"] == pytest.approx((1 / 3 + 0) / 2)


def test_summarize_accepts_results_that_went_through_json():
    import json

    typed = evaluate_instances(GT_6X6, PRED_6X6, GT_TYPE_6X6, PRED_TYPE_6X6)
    reloaded = json.loads(json.dumps(typed))
    assert summarize([reloaded])["per_type"][1]["f1"] == summarize([typed])["per_type"][1]["f1"]


def test_empty_truth_and_empty_prediction():
    empty = np.zeros((5, 5), dtype=np.int32)
    result = evaluate_instances(empty, empty)
    for metric in ("dice", "dice2", "aji", "aji_plus", "pq", "dq", "sq", "det_f1"):
        assert math.isnan(result[metric]), metric
    assert (result["tp"], result["fp"], result["fn"]) == (0, 0, 0)


def test_empty_truth_with_predictions():
    pred = row((12, 0, 2), length=5)
    result = evaluate_instances(np.zeros_like(pred), pred)
    assert (result["dice"], result["dice2"], result["aji"], result["aji_plus"]) == (0, 0, 0, 0)
    assert math.isnan(result["pq"]) and math.isnan(result["dq"]) and math.isnan(result["sq"])
    assert (result["tp"], result["fp"], result["fn"]) == (0, 1, 0)
    assert result["det_f1"] == 0.0


def test_empty_prediction_with_truth():
    gt = row((12, 0, 2), (13, 3, 4), length=5)
    result = evaluate_instances(gt, np.zeros_like(gt))
    assert (result["dice"], result["dice2"], result["aji"], result["aji_plus"]) == (0, 0, 0, 0)
    assert (result["pq"], result["dq"], result["sq"]) == (0, 0, 0)
    assert (result["tp"], result["fp"], result["fn"]) == (0, 0, 2)
    assert result["det_f1"] == 0.0


def test_identical_maps_with_different_ids_score_one():
    gt = GT_6X6
    pred = np.select([gt == 3, gt == 70, gt == 9], [1000, 2, 77], 0)
    result = evaluate_instances(gt, pred)
    for metric in ("dice", "dice2", "aji", "aji_plus", "pq", "dq", "sq", "det_f1"):
        assert result[metric] == pytest.approx(1.0), metric


def test_centroid_pairing_maximises_pairs_within_radius():
    # Raw minimum-distance assignment would take A-Q (17.0, beyond 12) + B-P (1.0)
    # = 18.0 < A-P + B-Q = 23.0 and keep one pair; two pairs fit within the radius.
    gt = np.array([[0.0, 0.0], [11.5, 1.0]])  # A, B
    pred = np.array([[11.5, 0.0], [11.5, 12.5]])  # P, Q
    pairs = pair_centroids(gt, pred, radius=12)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)]
    assert pair_centroids(gt, np.zeros((0, 2))).shape == (0, 2)


def test_aggregate_panoptic_per_image_then_tissue_then_overall():
    results = [{"pq": 0.5, "mpq": 0.4}, {"pq": nan, "mpq": 0.2}, {"pq": 0.8, "mpq": nan}]
    aggregate = aggregate_panoptic(results, ["Breast", "Breast", "Colon"])
    assert aggregate["per_tissue"]["Breast"] == {"images": 2, "bpq": 0.5, "mpq": pytest.approx(0.3)}
    assert math.isnan(aggregate["per_tissue"]["Colon"]["mpq"])
    assert aggregate["bpq"] == pytest.approx(0.65)  # (0.5 + 0.8) / 2 tissues
    assert aggregate["mpq"] == pytest.approx(0.3)  # Colon has no typed truth: skipped


def test_aggregate_panoptic_without_types_reports_bpq_only():
    aggregate = aggregate_panoptic([{"pq": 0.2}, {"pq": 0.6}], ["Skin", "Liver"])
    assert aggregate["bpq"] == pytest.approx(0.4) and "mpq" not in aggregate


@pytest.mark.parametrize(
    "call",
    [
        lambda: evaluate_instances(GT_6X6, PRED_6X6[:5]),
        lambda: evaluate_instances(GT_6X6.astype(float), PRED_6X6),
        lambda: evaluate_instances(GT_6X6, PRED_6X6, gt_type=GT_TYPE_6X6),
        lambda: panoptic_quality(GT_6X6, PRED_6X6, iou_threshold=0.3),
        lambda: aggregate_panoptic([{"pq": 0.1}], ["Skin", "Liver"]),
        lambda: aggregate_panoptic([{"pq": 0.1, "mpq": 0.1}, {"pq": 0.1}], ["Skin", "Liver"]),
        lambda: summarize([]),
        lambda: summarize(
            [
                evaluate_instances(GT_6X6, PRED_6X6),
                evaluate_instances(GT_6X6, PRED_6X6, GT_TYPE_6X6, PRED_TYPE_6X6),
            ]
        ),
    ],
)
def test_bad_input_raises_cmdfed_error(call):
    with pytest.raises(CmdfedError):
        call()


def random_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Discs as truth; prediction shifts, grows, drops, splits and adds nuclei."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:64, :64]
    gt = np.zeros((64, 64), dtype=np.int32)
    pred = np.zeros((64, 64), dtype=np.int32)
    for index in range(12):
        r, c, radius = rng.integers(4, 60), rng.integers(4, 60), rng.integers(3, 8)
        gt[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = 10 * index + 3
        if rng.random() < 0.15:
            continue  # missed
        dr, dc, dradius = rng.integers(-2, 3, size=3)
        disc = (rows - r - dr) ** 2 + (cols - c - dc) ** 2 <= (radius + dradius) ** 2
        pred[disc] = 7 * index + 1
        if rng.random() < 0.2:
            pred[disc & (cols > c)] = 7 * index + 2  # split in two
    pred[rng.integers(0, 64, 3), rng.integers(0, 64, 3)] = 500  # scattered false positive
    return gt, pred


@pytest.mark.parametrize("seed", range(5))
def test_pq_agrees_with_cellseg_metrics(seed):
    cellseg_metrics = pytest.importorskip("cellseg_metrics")
    gt, pred = random_pair(seed)
    ours = panoptic_quality(gt, pred)
    theirs = cellseg_metrics.panoptic_quality(gt, pred)
    assert ours.tp > 0
    assert ours.pq == pytest.approx(theirs["pq"], abs=1e-6)
    assert ours.dq == pytest.approx(theirs["dq"], abs=1e-6)
    assert ours.sq == pytest.approx(theirs["sq"], abs=1e-6)
