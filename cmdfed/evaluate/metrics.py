"""Cell-level metrics for nuclei instance segmentation and classification.

All metrics compare a ground-truth instance map with a predicted one (H x W integers,
0 = background, ids arbitrary and not necessarily contiguous). Every instance-level
metric starts from one pairwise overlap table (intersection of every ground-truth
instance with every prediction) built from a single sort of the (gt, pred) pixel
pairs, so nothing loops over pixels or builds one mask per instance.

Definitions (G_i ground-truth nuclei, S_j predicted nuclei, |.| pixel counts):

Dice
    Binary foreground Dice, 2|G ∩ S| / (|G| + |S|) with G, S the union of all nuclei.
Dice 2 (HoVer-Net's ``get_fast_dice_2``, "ensemble Dice")
    2 Σ|G_i ∩ S_j| / Σ(|G_i| + |S_j|), both sums over every overlapping (i, j) pair.
AJI (Kumar et al. 2017, MoNuSeg's ``aggregated_jaccard_index.m``; HoVer-Net's
``get_fast_aji``)
    Each G_i is paired with the S_j of highest IoU among those it overlaps (ties: the
    smallest prediction id). A prediction may be paired with several G_i and then
    counts in the union once per pairing, which is MoNuSeg's over-penalisation of
    merges. G_i overlapping nothing add |G_i| to the union; predictions paired with no
    G_i add |S_j|. AJI = Σ|G_i ∩ S_j(i)| / (Σ|G_i ∪ S_j(i)| + unpaired areas).
    Note: the cellseg-metrics package pairs by largest intersection instead, which
    gives a different (not MoNuSeg) value.
AJI+ (Graham et al. 2019, HoVer-Net's ``get_fast_aji_plus``)
    As AJI, but pairs are one-to-one: the assignment maximising the summed IoU
    (Hungarian), keeping pairs with IoU > 0; everything unpaired adds its area.
PQ, DQ, SQ (Kirillov et al. 2019, as in HoVer-Net's ``get_fast_pq``)
    (G_i, S_j) match when IoU > 0.5, which can pair each instance at most once.
    DQ = TP / (TP + FP/2 + FN/2), SQ = Σ matched IoU / TP, PQ = DQ x SQ.
    SQ is 0 when TP = 0 (HoVer-Net's convention).
Detection F1 (HoVer-Net ``pair_coordinates`` + ``run_nuclei_type_stat``)
    Centroids are paired one-to-one within ``match_radius`` pixels (12 in HoVer-Net)
    by a minimum-cost assignment of centroid distances. HoVer-Net assigns on raw
    distances and then drops pairs beyond the radius, which can lose a valid pair;
    here distances beyond the radius cost more than any set of valid pairs, so the
    assignment first maximises the number of pairs within the radius, then minimises
    their total distance. HoVer-Net also truncates centroids to integers; these are
    exact means of pixel coordinates.
Per-type classification F1 (HoVer-Net, Graham et al. 2019 eq. 7)
    Over detection-paired nuclei, for type t: TPc = both t, FPc = predicted t but
    truly not, FNc = truly t but predicted not; unpaired predictions / ground truth of
    type t add FPd / FNd. F1_t = 2TPc / (2TPc + 2FPc + 2FNc + FPd + FNd). (HoVer-Net's
    formula also has TN terms, but counted over pairs involving t they are always 0.)
mPQ and bPQ (PanNuke, TissueImageAnalytics/PanNuke-metrics ``run.py``)
    Per image and type t, PQ between the ground-truth and predicted nuclei of type t
    only; bPQ is the per-image PQ ignoring types. See ``aggregate_panoptic``.

Empty images (these conventions matter when averaging over images):

=========================  ===================  ===================  =================
metric                     no truth, no pred    no truth, some pred  truth, no pred
=========================  ===================  ===================  =================
Dice, Dice 2, AJI, AJI+    NaN                  0                    0
PQ, DQ, SQ (and per type)  NaN                  NaN (PanNuke)        0
detection F1               NaN                  0                    0
=========================  ===================  ===================  =================

PanNuke's evaluation sets PQ to NaN whenever the image has no ground truth (for that
type), whatever was predicted, and skips NaNs when averaging; the TP/FP/FN counts are
kept, so pooled statistics in ``summarize`` still see those false positives. Dice 2
with instances present but no overlapping pair is 0 (HoVer-Net's code divides by zero).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from cmdfed.errors import CmdfedError
from cmdfed.inference.nuclei import LabelIndex

PQ_IOU_THRESHOLD = 0.5
DETECTION_RADIUS = 12.0

# Counts kept per image so that summarize() can pool them over a data set.
_PER_TYPE_COUNTS = ("tp", "fp", "fn", "iou_sum", "cls_tp", "cls_fp", "cls_fn", "det_fp", "det_fn")


@dataclass(frozen=True)
class InstanceOverlap:
    """Pixel counts of every ground-truth instance against every prediction."""

    gt: LabelIndex
    pred: LabelIndex
    intersection: np.ndarray  # (n_gt, n_pred) int64

    @classmethod
    def of(cls, gt_inst: np.ndarray, pred_inst: np.ndarray) -> InstanceOverlap:
        if gt_inst.shape != pred_inst.shape:
            raise CmdfedError(
                f"ground truth has shape {gt_inst.shape} but prediction has "
                f"{pred_inst.shape}; compare maps of the same tile"
            )
        gt = LabelIndex.of(gt_inst, "ground-truth instance map")
        pred = LabelIndex.of(pred_inst, "predicted instance map")
        both = (gt.pixel_rows >= 0) & (pred.pixel_rows >= 0)
        pair_codes = gt.pixel_rows[both] * len(pred) + pred.pixel_rows[both]
        codes, counts = np.unique(pair_codes, return_counts=True)
        intersection = np.zeros((len(gt), len(pred)), dtype=np.int64)
        intersection[codes // max(len(pred), 1), codes % max(len(pred), 1)] = counts
        return cls(gt, pred, intersection)

    @cached_property
    def union(self) -> np.ndarray:
        return self.gt.areas[:, None] + self.pred.areas[None, :] - self.intersection

    @cached_property
    def iou(self) -> np.ndarray:
        return self.intersection / self.union  # union >= 1: every instance has a pixel


@dataclass(frozen=True)
class PanopticCounts:
    """Matched pairs (tp), unmatched predictions (fp) and truths (fn), summed IoU.

    The quality properties are the plain formulas: NaN only when there is nothing at
    all; PanNuke's "NaN without ground truth" rule is applied per image by
    ``evaluate_instances``.
    """

    tp: int
    fp: int
    fn: int
    iou_sum: float

    @property
    def dq(self) -> float:
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return self.tp / denominator if denominator else float("nan")

    @property
    def sq(self) -> float:
        if self.tp + self.fp + self.fn == 0:
            return float("nan")
        return self.iou_sum / self.tp if self.tp else 0.0

    @property
    def pq(self) -> float:
        return self.dq * self.sq


def dice(gt_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Binary foreground Dice of two instance (or binary) maps."""
    if gt_inst.shape != pred_inst.shape:
        raise CmdfedError(f"shapes differ: {gt_inst.shape} vs {pred_inst.shape}")
    gt, pred = gt_inst > 0, pred_inst > 0
    total = int(gt.sum()) + int(pred.sum())
    return 2.0 * int((gt & pred).sum()) / total if total else float("nan")


def dice2(gt_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """HoVer-Net's Dice 2 (see the module docstring)."""
    return _dice2(InstanceOverlap.of(gt_inst, pred_inst))


def aji(gt_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """MoNuSeg's Aggregated Jaccard Index, pairing by maximum IoU (module docstring)."""
    return _aji(InstanceOverlap.of(gt_inst, pred_inst))


def aji_plus(gt_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """HoVer-Net's AJI+, one-to-one pairing by maximum summed IoU (module docstring)."""
    return _aji_plus(InstanceOverlap.of(gt_inst, pred_inst))


def panoptic_quality(
    gt_inst: np.ndarray, pred_inst: np.ndarray, iou_threshold: float = PQ_IOU_THRESHOLD
) -> PanopticCounts:
    """TP/FP/FN and summed IoU of matches with IoU > ``iou_threshold`` (>= 0.5)."""
    overlap = InstanceOverlap.of(gt_inst, pred_inst)
    return _panoptic(overlap, _matched(overlap, iou_threshold))


def pair_centroids(gt_xy: np.ndarray, pred_xy: np.ndarray, radius: float = DETECTION_RADIUS) -> np.ndarray:
    """(k, 2) row indices of one-to-one centroid pairs at most ``radius`` apart.

    Maximises the number of pairs, then minimises their summed distance.
    """
    gt_xy = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    if not (len(gt_xy) and len(pred_xy)):
        return np.zeros((0, 2), dtype=np.int64)
    distance = cdist(gt_xy, pred_xy)
    within = distance <= radius
    # Any pair beyond the radius costs more than the largest possible sum of valid pairs.
    out_of_reach = radius * (min(distance.shape) + 1) + 1.0
    gt_rows, pred_rows = linear_sum_assignment(np.where(within, distance, out_of_reach))
    keep = within[gt_rows, pred_rows]
    return np.stack([gt_rows[keep], pred_rows[keep]], axis=1).astype(np.int64)


def _dice2(overlap: InstanceOverlap) -> float:
    if len(overlap.gt) + len(overlap.pred) == 0:
        return float("nan")
    gt_rows, pred_rows = np.nonzero(overlap.intersection)
    total = overlap.gt.areas[gt_rows].sum() + overlap.pred.areas[pred_rows].sum()
    return float(2.0 * overlap.intersection[gt_rows, pred_rows].sum() / total) if total else 0.0


def _aji_from_pairs(overlap: InstanceOverlap, gt_rows: np.ndarray, pred_rows: np.ndarray) -> float:
    intersection = overlap.intersection[gt_rows, pred_rows].sum()
    union = overlap.union[gt_rows, pred_rows].sum()
    gt_paired = np.zeros(len(overlap.gt), dtype=bool)
    gt_paired[gt_rows] = True
    pred_paired = np.zeros(len(overlap.pred), dtype=bool)
    pred_paired[pred_rows] = True
    union += overlap.gt.areas[~gt_paired].sum() + overlap.pred.areas[~pred_paired].sum()
    return float(intersection / union) if union else float("nan")


def _aji(overlap: InstanceOverlap) -> float:
    gt_rows = np.flatnonzero(overlap.intersection.any(axis=1))
    # argmax takes the first maximum, i.e. the smallest id, as MoNuSeg's loop does.
    pred_rows = overlap.iou[gt_rows].argmax(axis=1) if gt_rows.size else gt_rows
    return _aji_from_pairs(overlap, gt_rows, pred_rows)


def _aji_plus(overlap: InstanceOverlap) -> float:
    # Only instances that overlap something can be paired; a smaller matrix is faster.
    gt_candidates = np.flatnonzero(overlap.intersection.any(axis=1))
    pred_candidates = np.flatnonzero(overlap.intersection.any(axis=0))
    iou = overlap.iou[np.ix_(gt_candidates, pred_candidates)]
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = iou[rows, cols] > 0
    return _aji_from_pairs(overlap, gt_candidates[rows[keep]], pred_candidates[cols[keep]])


def _matched(overlap: InstanceOverlap, iou_threshold: float) -> np.ndarray:
    """(n_gt, n_pred) bool: pairs with IoU above the threshold (unique when >= 0.5)."""
    if not PQ_IOU_THRESHOLD <= iou_threshold < 1.0:
        raise CmdfedError(
            f"iou_threshold must be in [0.5, 1), got {iou_threshold}; below 0.5 a "
            "prediction could match two nuclei and PQ would need an assignment step"
        )
    return overlap.iou > iou_threshold


def _panoptic(
    overlap: InstanceOverlap,
    matched: np.ndarray,
    gt_selected: np.ndarray | None = None,
    pred_selected: np.ndarray | None = None,
) -> PanopticCounts:
    """Counts over the selected ground-truth rows and prediction columns (default all)."""
    if gt_selected is None:
        gt_selected = np.ones(len(overlap.gt), dtype=bool)
    if pred_selected is None:
        pred_selected = np.ones(len(overlap.pred), dtype=bool)
    selection = np.ix_(gt_selected, pred_selected)
    sub_matched = matched[selection]
    tp = int(sub_matched.sum())
    iou_sum = float(overlap.iou[selection][sub_matched].sum())
    return PanopticCounts(tp, int(pred_selected.sum()) - tp, int(gt_selected.sum()) - tp, iou_sum)


def evaluate_instances(
    gt_inst: np.ndarray,
    pred_inst: np.ndarray,
    gt_type: np.ndarray | None = None,
    pred_type: np.ndarray | None = None,
    *,
    match_radius: float = DETECTION_RADIUS,
) -> dict:
    """All metrics of one image as a dict of plain Python numbers.

    ``gt_type`` / ``pred_type`` are optional per-pixel type maps (H, W); each instance
    takes the majority type of its pixels (ignoring 0, see ``LabelIndex.majority_types``).
    Give both or neither. Keys:

    ``gt_count``, ``pred_count``; ``dice``, ``dice2``, ``aji``, ``aji_plus``;
    ``pq``, ``dq``, ``sq`` (the per-image binary PQ, i.e. PanNuke's bPQ) with ``tp``,
    ``fp``, ``fn``, ``iou_sum``; ``det_f1`` with ``det_tp``, ``det_fp``, ``det_fn``.
    With types also: ``mpq`` (mean PQ over the types present in the ground truth, NaN
    if none), ``type_agree`` (detection pairs whose types agree) and ``per_type``:
    {type id: {``pq``, ``dq``, ``sq``, ``tp``, ``fp``, ``fn``, ``iou_sum``, ``cls_tp``,
    ``cls_fp``, ``cls_fn``, ``det_fp``, ``det_fn``}} for every non-zero type present in
    either map (``cls_*`` / ``det_*`` as in the module docstring's classification F1).
    """
    if (gt_type is None) != (pred_type is None):
        raise CmdfedError("give both gt_type and pred_type, or neither")
    overlap = InstanceOverlap.of(gt_inst, pred_inst)
    matched = _matched(overlap, PQ_IOU_THRESHOLD)
    binary = _panoptic(overlap, matched)
    has_truth = len(overlap.gt) > 0
    pairs = pair_centroids(overlap.gt.centroids_xy(), overlap.pred.centroids_xy(), match_radius)
    det_tp = len(pairs)
    det_fp = len(overlap.pred) - det_tp
    det_fn = len(overlap.gt) - det_tp
    result: dict = {
        "gt_count": len(overlap.gt),
        "pred_count": len(overlap.pred),
        "dice": dice(gt_inst, pred_inst),
        "dice2": _dice2(overlap),
        "aji": _aji(overlap),
        "aji_plus": _aji_plus(overlap),
        **_panoptic_entries(binary, has_truth),
        "det_f1": _f1(det_tp, det_fp, det_fn),
        "det_tp": det_tp,
        "det_fp": det_fp,
        "det_fn": det_fn,
    }
    if gt_type is not None:
        gt_types = overlap.gt.majority_types(gt_type)[0]
        pred_types = overlap.pred.majority_types(pred_type)[0]
        result.update(_typed_entries(overlap, matched, pairs, gt_types, pred_types))
    return result


def _panoptic_entries(counts: PanopticCounts, has_truth: bool) -> dict:
    nan = float("nan")
    return {
        "pq": counts.pq if has_truth else nan,
        "dq": counts.dq if has_truth else nan,
        "sq": counts.sq if has_truth else nan,
        "tp": counts.tp,
        "fp": counts.fp,
        "fn": counts.fn,
        "iou_sum": counts.iou_sum,
    }


def _typed_entries(
    overlap: InstanceOverlap,
    matched: np.ndarray,
    pairs: np.ndarray,
    gt_types: np.ndarray,
    pred_types: np.ndarray,
) -> dict:
    paired_gt_types = gt_types[pairs[:, 0]]
    paired_pred_types = pred_types[pairs[:, 1]]
    unpaired_gt = np.ones(gt_types.size, dtype=bool)
    unpaired_gt[pairs[:, 0]] = False
    unpaired_pred = np.ones(pred_types.size, dtype=bool)
    unpaired_pred[pairs[:, 1]] = False
    per_type = {}
    for type_id in np.union1d(gt_types, pred_types):
        if type_id == 0:
            continue
        gt_of_type, pred_of_type = gt_types == type_id, pred_types == type_id
        counts = _panoptic(overlap, matched, gt_of_type, pred_of_type)
        truly, predicted = paired_gt_types == type_id, paired_pred_types == type_id
        per_type[int(type_id)] = {
            **_panoptic_entries(counts, bool(gt_of_type.any())),
            "cls_tp": int((truly & predicted).sum()),
            "cls_fp": int((~truly & predicted).sum()),
            "cls_fn": int((truly & ~predicted).sum()),
            "det_fp": int((unpaired_pred & pred_of_type).sum()),
            "det_fn": int((unpaired_gt & gt_of_type).sum()),
        }
    return {
        "mpq": _nanmean([entry["pq"] for entry in per_type.values()]),
        "type_agree": int((paired_gt_types == paired_pred_types).sum()),
        "per_type": per_type,
    }


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN (without numpy's warning) when nothing is left."""
    finite = [value for value in values if not np.isnan(value)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(results: Sequence[Mapping]) -> dict:
    """Data-set summary of ``evaluate_instances`` results.

    ``mean_<metric>``: mean over images of each per-image metric, skipping NaN (how
    HoVer-Net's ``compute_stats`` and PanNuke report Dice, AJI, PQ, mPQ).
    ``pooled_*``: counts summed over images first: ``pooled_pq/dq/sq`` from summed
    TP/FP/FN/IoU, ``pooled_det_f1`` (HoVer-Net's detection F1 is pooled this way),
    and with types ``type_accuracy`` (paired nuclei with the right type),
    ``mpq_plus`` (CoNIC's mPQ+: PQ per type from pooled counts, averaged over types)
    and ``per_type`` {type: {``mean_pq`` (PanNuke's per-class PQ), ``pooled_pq``,
    ``f1`` (HoVer-Net's classification F1), and the pooled counts}}.
    """
    if not results:
        raise CmdfedError("nothing to summarize: evaluate at least one image first")
    typed = _all_typed(results)
    summary: dict = {"images": len(results)}
    for metric in ("dice", "dice2", "aji", "aji_plus", "pq", "dq", "sq", "det_f1", "mpq"):
        if metric in results[0]:
            summary[f"mean_{metric}"] = _nanmean([result[metric] for result in results])

    pooled = PanopticCounts(*(sum(result[key] for result in results) for key in ("tp", "fp", "fn", "iou_sum")))
    det_tp, det_fp, det_fn = (sum(result[key] for result in results) for key in ("det_tp", "det_fp", "det_fn"))
    summary.update(
        pooled_pq=pooled.pq,
        pooled_dq=pooled.dq,
        pooled_sq=pooled.sq,
        pooled_det_f1=_f1(det_tp, det_fp, det_fn),
    )
    if typed:
        summary.update(_summarize_types(results, det_tp))
    return summary


def _summarize_types(results: Sequence[Mapping], det_tp: int) -> dict:
    per_image_pq: dict[int, list[float]] = defaultdict(list)
    pooled_counts: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(_PER_TYPE_COUNTS, 0))
    for result in results:
        # int() so that results that went through JSON (string keys) work too.
        for type_id, entry in result["per_type"].items():
            per_image_pq[int(type_id)].append(entry["pq"])
            for key in _PER_TYPE_COUNTS:
                pooled_counts[int(type_id)][key] += entry[key]
    per_type = {}
    for type_id in sorted(pooled_counts):
        counts = pooled_counts[type_id]
        panoptic = PanopticCounts(counts["tp"], counts["fp"], counts["fn"], counts["iou_sum"])
        f1_denominator = (
            2 * (counts["cls_tp"] + counts["cls_fp"] + counts["cls_fn"]) + counts["det_fp"] + counts["det_fn"]
        )
        per_type[type_id] = {
            "mean_pq": _nanmean(per_image_pq[type_id]),
            "pooled_pq": panoptic.pq,
            "f1": 2 * counts["cls_tp"] / f1_denominator if f1_denominator else float("nan"),
            **counts,
        }
    type_agree = sum(result["type_agree"] for result in results)
    return {
        "type_accuracy": type_agree / det_tp if det_tp else float("nan"),
        "mpq_plus": _nanmean([entry["pooled_pq"] for entry in per_type.values()]),
        "per_type": per_type,
    }


def _all_typed(results: Sequence[Mapping]) -> bool:
    """Whether the results carry type metrics; raises if only some do."""
    typed = ["mpq" in result for result in results]
    if any(typed) and not all(typed):
        raise CmdfedError(
            "some results have types (mpq) and some do not; evaluate every image with gt_type and pred_type, or none"
        )
    return all(typed)


def aggregate_panoptic(results: Sequence[Mapping], tissues: Sequence[str]) -> dict:
    """PanNuke's bPQ and mPQ: per image, then mean per tissue, then mean over tissues.

    ``results[i]`` is ``evaluate_instances`` of image i and ``tissues[i]`` its tissue.
    Per image, bPQ is the binary PQ and mPQ the mean over types present in that
    image's ground truth (types absent from it are NaN whatever was predicted). Each
    tissue's value is the NaN-skipping mean over its images, and the overall value the
    NaN-skipping mean over tissues, as PanNuke-metrics ``run.py`` computes them.
    Returns {``bpq``, ``mpq`` (only when types were evaluated), ``per_tissue``:
    {tissue: {``bpq``, ``mpq``, ``images``}}}.
    """
    if len(results) != len(tissues):
        raise CmdfedError(f"{len(results)} results but {len(tissues)} tissue names; give one tissue per image")
    if not results:
        raise CmdfedError("nothing to aggregate: evaluate at least one image first")
    metrics = ("bpq", "mpq") if _all_typed(results) else ("bpq",)
    by_tissue: dict[str, list[Mapping]] = defaultdict(list)
    for result, tissue in zip(results, tissues):
        by_tissue[tissue].append(result)
    per_tissue = {}
    for tissue, tissue_results in by_tissue.items():
        per_tissue[tissue] = {"images": len(tissue_results)}
        for metric in metrics:
            source = "pq" if metric == "bpq" else "mpq"
            per_tissue[tissue][metric] = _nanmean([result[source] for result in tissue_results])
    aggregate: dict = {metric: _nanmean([entry[metric] for entry in per_tissue.values()]) for metric in metrics}
    aggregate["per_tissue"] = per_tissue
    return aggregate
