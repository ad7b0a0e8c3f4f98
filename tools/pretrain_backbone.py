#!/usr/bin/env python
"""Pretrain a detectron2 backbone with a throwaway CenterNet-style dense head.

The command line of ``detr_d2.pretraining``, whose docstring describes the method: the
targets, head and losses, the schedule, the evaluation ("dense head AP", every
``--eval-period`` iterations and at the end) and the checkpoint format.

Output: ``--output`` (default output/shapes_backbone/backbone.pth), written atomically
at each evaluation, loadable as MODEL.WEIGHTS of the same config; a log is written
beside it.

Example (the shapes demo)::

    python datasets/prepare_shapes.py --preset pretrain --splits train:4000,val:200
    python tools/pretrain_backbone.py --config-file configs/shapes/Base-Shapes.yaml \
        --dataset-dir datasets/shapes_pretrain --max-minutes 10 \
        --output output/shapes_backbone/backbone.pth
"""
import dataclasses
import logging
import os
import sys

import detr_d2  # noqa: F401  (first: applies the compat fixes, registers the backbones)
from detectron2.utils.logger import setup_logger

from detr_d2.pretraining import PretrainingOptions, paths_of_split, pretrain_backbone
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_overrides

logger = logging.getLogger("detr_d2.pretrain_backbone")


def build_parser():
    """The command-line interface."""
    parser = ToolArgumentParser(__doc__, epilog="See the module docstring for the method.")
    parser.add_argument("--config-file", default="configs/shapes/Base-Shapes.yaml",
                        help="DETR config whose backbone is pretrained")
    parser.add_argument("--dataset-dir", help="folder with annotations/<split>.json and "
                        "images/<split>/ (as datasets/prepare_shapes.py writes)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--train-json"), parser.add_argument("--train-images")
    parser.add_argument("--val-json"), parser.add_argument("--val-images")
    parser.add_argument("--output", default="output/shapes_backbone/backbone.pth",
                        help="backbone checkpoint to write (a log goes beside it)")
    parser.add_argument("--class-agnostic", action="store_true",
                        help="one 'object' heatmap instead of one per class")
    parser.add_argument("--max-iter", type=int, default=100000)
    parser.add_argument("--max-minutes", type=float, default=10.0,
                        help="stop after this many minutes of training (0: no limit)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=100)
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--eval-period", type=int, default=500,
                        help="evaluate and save every N iterations (0: only at the end)")
    parser.add_argument("--top-k", type=int, default=100, help="detections per image")
    parser.add_argument("--log-period", type=int, default=20)
    parser.add_argument("--num-threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    add_config_overrides(parser, example="MODEL.TINY_CNN.WIDTH 48")
    return parser


def parse_args(argv=None):
    """Parsed arguments; the json and image paths not given come from --dataset-dir."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for split_name in ("train", "val"):
        for kind in ("json", "images"):
            attribute = f"{split_name}_{kind}"
            if getattr(args, attribute) is None:
                if not args.dataset_dir:
                    parser.error(f"give --dataset-dir or --{split_name}-{kind}")
                split = getattr(args, f"{split_name}_split")
                path = paths_of_split(args.dataset_dir, split)[0 if kind == "json" else 1]
                setattr(args, attribute, path)
    return args


def options_of(args):
    """The ``PretrainingOptions`` of parsed arguments."""
    return PretrainingOptions(**{field.name: getattr(args, field.name)
                                 for field in dataclasses.fields(PretrainingOptions)})


def main(argv=None):
    args = parse_args(argv)
    log_file = os.path.splitext(args.output)[0] + "_log.txt"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    setup_logger(output=log_file, name="detr_d2", abbrev_name="pretrain")
    logger.info(f"Arguments: {vars(args)}")
    pretrain_backbone(options_of(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
