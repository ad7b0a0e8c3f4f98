#!/usr/bin/env python
"""PQ / SQ / RQ (all, things, stuff) of a panoptic model at several PANOPTIC_THRESHOLDs.

    python tools/sweep_panoptic_threshold.py --config-file RUN/config.yaml --dataset NAME \\
        [--register PANOPTIC_JSON PNG_DIR IMAGE_DIR] [--thresholds 0.5,0.6,0.7,0.8,0.85,0.9] \\
        [--output DIR] [[--opts] MODEL.WEIGHTS RUN/model_final.pth KEY VALUE ...]

One inference pass over the dataset; each threshold's segmentation is scored by detectron2's
COCOPanopticEvaluator. Use held-out data (not the test set) to choose the threshold, then
set MODEL.DETR.PANOPTIC_THRESHOLD. ``--register`` registers ``--dataset`` from a
COCO-panoptic json, its PNG folder and its image folder (checked as
DATASETS.REGISTER_COCO_PANOPTIC entries are); without it the name must be registered (a
builtin, or in the config). Prints a table and writes ``DIR/thresholds.json`` (default DIR:
OUTPUT_DIR/panoptic_thresholds) atomically, with the threshold of the highest PQ.
"""
import argparse
import logging
import os
import sys

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from tabulate import tabulate

from detectron2.data import MetadataCatalog

from detr_d2.data.coco_panoptic import register_coco_panoptic_dataset
from detr_d2.data.coco_registration import absolute_path
from detr_d2.engine import AtomicDetectionCheckpointer, Trainer, build_config
from detr_d2.engine.datasets import check_dataset_names
from detr_d2.errors import SetupError
from detr_d2.evaluation.panoptic_thresholds import pq_at_thresholds
from detr_d2.utils.outputs import write_json
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_arguments
from detr_d2.utils.tool_setup import run_tool, setup_tool_logging

logger = logging.getLogger("detectron2")
DEFAULT_THRESHOLDS = "0.5,0.6,0.7,0.8,0.85,0.9"
METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


def thresholds(text):
    """The comma-separated thresholds of ``text``, each in [0, 1)."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not 0 <= value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more thresholds in [0, 1), e.g. 0.6,0.7,0.85")
    return sorted(set(values))


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser, help="the run's config (PANOPTIC_ON)", example="MODEL.WEIGHTS model_final.pth")
    parser.add_argument("--dataset", required=True, metavar="NAME", help="the panoptic dataset to score")
    parser.add_argument("--register", nargs=3, metavar=("PANOPTIC_JSON", "PNG_DIR", "IMAGE_DIR"),
                        help="register --dataset from these files first")
    parser.add_argument("--thresholds", type=thresholds, default=thresholds(DEFAULT_THRESHOLDS),
                        help=f"comma-separated (default: {DEFAULT_THRESHOLDS})")
    parser.add_argument("--output", metavar="DIR", help="default: OUTPUT_DIR/panoptic_thresholds")
    return parser


def results_table(results):
    """One row per threshold: PQ, SQ, RQ of all segments, things and stuff."""
    rows = [(t, *(f"{results[t][m]:.1f}" for m in METRICS)) for t in sorted(results)]
    return tabulate(rows, headers=("threshold", *METRICS), tablefmt="github", disable_numparse=True)


def check_same_classes(cfg, dataset):
    """SetupError unless ``dataset`` has the thing and stuff classes of the config's training set."""
    trained = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
    scored = MetadataCatalog.get(dataset)
    for key in ("thing_classes", "stuff_classes"):
        if trained is not None and trained.get(key, None) != scored.get(key, None):
            raise SetupError(f"dataset {dataset!r} has {key} {scored.get(key, None)}, the model's training set "
                             f"{cfg.DATASETS.TRAIN[0]!r} {trained.get(key, None)}: score the model on data of its "
                             "own classes")


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    if args.register:
        register_coco_panoptic_dataset(args.dataset, *map(absolute_path, args.register))
    cfg = build_config(args.config_file, [*args.opts, "MODEL.DETR.FROZEN_WEIGHTS", "", "TEST.EVAL_LOSSES", "False"])
    if not cfg.MODEL.DETR.PANOPTIC_ON:
        raise SetupError(f"{args.config_file} has MODEL.DETR.PANOPTIC_ON False: give a panoptic model's config")
    check_dataset_names((args.dataset,), "--dataset")
    check_same_classes(cfg, args.dataset)
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "panoptic_thresholds")
    model = Trainer.build_model(cfg).eval()
    AtomicDetectionCheckpointer(model).load_for_inference(cfg.MODEL.WEIGHTS)
    results = pq_at_thresholds(model, Trainer.build_test_loader(cfg, args.dataset), args.dataset,
                               args.thresholds, output)
    best = max(results, key=lambda t: results[t]["PQ"])
    print(f"{args.dataset}, {cfg.MODEL.WEIGHTS}:\n{results_table(results)}\nhighest PQ at threshold {best}")
    write_json(os.path.join(output, "thresholds.json"),
               {"dataset": args.dataset, "weights": cfg.MODEL.WEIGHTS, "best_threshold": best,
                "results": {str(t): results[t] for t in sorted(results)}})
    logger.info(f"Wrote {output}/thresholds.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
