#!/usr/bin/env python
"""Time the official (pycocotools) and the fast (faster-coco-eval) COCO evaluation end to end.

    python tools/benchmark_coco_eval.py [--images 5000] [--detections 100] [--categories 80]
        [--iou-type bbox|segm] [--seed 0] [--json FILE]

Generates COCO-like ground truth (``--images`` images of 480-640 px, about 7 objects
each, crowd objects, images without objects, ``--categories`` COCO category ids) and
``--detections`` detections per image (``detr_d2.evaluation.synthetic_coco``), then runs
one evaluation with each implementation as detectron2's COCOEvaluator does (the
ground-truth json loaded, the detections through loadRes, evaluate, accumulate,
summarize; ``detr_d2.evaluation.coco_eval_benchmark``) and prints the seconds of each
phase, the speed-up and both AP tables. ``--json`` also writes the numbers to FILE.

Exit status 0 when both give the same stats (to 1e-12), 1 otherwise.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time

import detr_d2  # noqa: F401  (first: compat fixes)
from detr_d2.checkpoint.io import atomic_write
from detr_d2.evaluation.coco_eval_benchmark import (
    PHASES,
    largest_stat_difference,
    stats_table,
    time_coco_evaluation,
)
from detr_d2.evaluation.synthetic_coco import synthetic_detections, synthetic_ground_truth
from detr_d2.utils.tool_setup import positive_int, run_tool, setup_tool_logging

IMPLS = ("official", "fast")
SAME_STATS_TOLERANCE = 1e-12

logger = logging.getLogger("detectron2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=5000, help="images (default: %(default)s)")
    parser.add_argument("--detections", type=positive_int, default=100,
                        help="detections per image (default: %(default)s)")
    parser.add_argument("--categories", type=positive_int, default=80,
                        help="categories, at most 80 (default: %(default)s)")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox",
                        help="boxes, or masks (slow to generate) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    return parser


def generated_data(args):
    """(ground-truth dict, detections) for ``args``, with a log line of their size."""
    start = time.perf_counter()
    with_masks = args.iou_type == "segm"
    ground_truth = synthetic_ground_truth(args.images, args.categories, with_masks=with_masks, seed=args.seed)
    detections = synthetic_detections(ground_truth, args.detections, with_masks=with_masks, seed=args.seed + 1)
    crowd = sum(a["iscrowd"] for a in ground_truth["annotations"])
    annotated = {a["image_id"] for a in ground_truth["annotations"]}
    logger.info(f"Generated {args.images} images ({args.images - len(annotated)} without objects), "
                f"{len(ground_truth['annotations'])} objects ({crowd} crowd), {len(detections)} detections, "
                f"{args.categories} categories in {time.perf_counter() - start:.1f} s")
    return ground_truth, detections


def timing_table(seconds):
    """Pipe table: seconds per phase and total of each implementation, and the speed-up."""
    lines = ["| phase | " + " | ".join(IMPLS) + " | official / fast |", "|---|---|---|---|"]
    for phase in (*PHASES, "total"):
        fast = seconds["fast"][phase]
        ratio = f"{seconds['official'][phase] / fast:.1f}x" if fast > 0.005 else ""
        lines.append(f"| {phase} | " + " | ".join(f"{seconds[impl][phase]:.2f}" for impl in IMPLS)
                     + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    ground_truth, detections = generated_data(args)
    seconds, stats = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        ground_truth_json = os.path.join(folder, "ground_truth.json")
        with open(ground_truth_json, "w") as file:
            json.dump(ground_truth, file)
        for impl in IMPLS:
            seconds[impl], stats[impl] = time_coco_evaluation(ground_truth_json, detections, impl, args.iou_type)
            logger.info(f"{impl}: {seconds[impl]['total']:.2f} s")
    difference = largest_stat_difference(stats["official"], stats["fast"])
    speedup = seconds["official"]["total"] / seconds["fast"]["total"]
    print(f"\nCOCO {args.iou_type} evaluation of {len(detections)} detections on {args.images} images, "
          f"{args.categories} categories (seconds):\n{timing_table(seconds)}\n\n"
          f"end to end: fast is {speedup:.1f}x faster\n\n{stats_table(stats)}\n\n"
          f"largest difference between the stats: {difference:.1e} "
          f"({'the same' if difference <= SAME_STATS_TOLERANCE else 'DIFFERENT'})", flush=True)
    if args.json:
        report = {"arguments": vars(args), "seconds": seconds, "speedup": speedup,
                  "stats": {impl: values.tolist() for impl, values in stats.items()},
                  "largest_stat_difference": difference}
        atomic_write(args.json, lambda file: json.dump(report, file, indent=1), binary=False)
    return 0 if difference <= SAME_STATS_TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(run_tool(main))
