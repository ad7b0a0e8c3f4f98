"""Time the official and the fast COCOeval end to end, as detectron2's COCOEvaluator runs them.

One evaluation, as ``COCOEvaluator`` does it once the predictions are collected:
``load`` (the ground-truth json read into pycocotools' ``COCO``, the detections through
``loadRes``), ``evaluate`` (for "fast" this includes handing both to faster-coco-eval),
``accumulate`` and ``summarize``. ``tools/benchmark_coco_eval.py`` runs it on generated
COCO-sized data (``synthetic_coco``).
"""
import contextlib
import copy
import io
import time

import numpy as np
from pycocotools.coco import COCO

from detr_d2.evaluation.fast_coco_eval import coco_eval_class

__all__ = ["PHASES", "STAT_NAMES", "largest_stat_difference", "stats_table", "time_coco_evaluation"]

PHASES = ("load", "evaluate", "accumulate", "summarize")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def time_coco_evaluation(ground_truth_json, results, impl, iou_type="bbox"):
    """One evaluation of COCO ``results`` against the json file ``ground_truth_json``.

    Args:
        ground_truth_json (str): COCO instances json.
        results (list[dict]): COCO results (boxes XYWH absolute pixels; "segmentation" RLE
            for "segm"); copied first (``loadRes`` writes into them).
        impl (str): "fast" or "official" (``coco_eval_class``).
        iou_type (str): "bbox" or "segm".

    Returns:
        (dict phase -> seconds, plus "total"; the 12 summary stats as a float64 array [12]).
    """
    results = copy.deepcopy(results)
    seconds = {}
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        coco_gt = COCO(ground_truth_json)
        coco_dt = coco_gt.loadRes(results)
        seconds["load"] = time.perf_counter() - start
        evaluation = coco_eval_class(impl)(coco_gt, coco_dt, iou_type)
        for phase in PHASES[1:]:
            start = time.perf_counter()
            getattr(evaluation, phase)()
            seconds[phase] = time.perf_counter() - start
    seconds["total"] = sum(seconds[phase] for phase in PHASES)
    return seconds, np.asarray(evaluation.stats[:len(STAT_NAMES)], dtype=np.float64)


def largest_stat_difference(stats_a, stats_b):
    """The largest absolute difference between two stats arrays (equal NaNs count as 0)."""
    both_nan = np.isnan(stats_a) & np.isnan(stats_b)
    differences = np.where(both_nan, 0.0, np.abs(stats_a - stats_b))
    return float(np.nan_to_num(differences, nan=np.inf).max())


def stats_table(stats_by_impl):
    """A pipe table of the summary stats in percent (3 decimals, as detectron2 prints AP),
    one column per implementation: {impl: stats [12]} -> str."""
    impls = list(stats_by_impl)
    lines = ["| metric | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for index, name in enumerate(STAT_NAMES):
        values = " | ".join(f"{100 * stats_by_impl[impl][index]:.3f}" for impl in impls)
        lines.append(f"| {name} | {values} |")
    return "\n".join(lines)
