#!/usr/bin/env python
"""Draw the ground truth of the config's training sets, as annotated or as the model sees it.

    python tools/visualize_data.py --config-file CFG --source {annotation,dataloader} \\
        --output-dir DIR [--num N] [[--opts] KEY VALUE ...]

--source annotation: each image of DATASETS.TRAIN with its annotated boxes and class names.
--source dataloader: what the training mapper (``DetrDatasetMapper(cfg, is_train=True)``)
feeds the model: the augmented image (flip, crop, multi-scale resize) with its boxes (and,
with MODEL.MASK_ON, its masks).
Augmentation is random, seeded with SEED when SEED >= 0. With
DATALOADER.FILTER_EMPTY_ANNOTATIONS, images without annotations are left out as in training.

One PNG per image, ``<dataset>_<image name>.png``, in DIR; --num N stops after N images.
Exit status: 0; 1 if some image could not be read (reported, the others are drawn); 2 on
a setup problem (config, datasets), reported in one line.
"""
import itertools
import logging
import os
import sys

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from detectron2.data import MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.env import seed_all_rng
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from detr_d2.data import DetrDatasetMapper
from detr_d2.engine import build_config
from detr_d2.engine.datasets import load_dataset_dicts
from detr_d2.errors import SetupError
from detr_d2.utils.inputs import OutputPaths, UnreadableInput, read_input_image
from detr_d2.utils.outputs import write_png
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_arguments
from detr_d2.utils.tool_setup import (
    EXIT_INPUT_FAILED,
    make_output_folder,
    positive_int,
    run_tool,
    setup_tool_logging,
)

logger = logging.getLogger("detectron2")


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser, help="config whose DATASETS.TRAIN are drawn", example="SEED 3")
    parser.add_argument("--source", required=True, choices=["annotation", "dataloader"],
                        help="the annotations as stored, or the training mapper's output")
    parser.add_argument("--output-dir", required=True, metavar="DIR")
    parser.add_argument("--num", type=positive_int, default=None, metavar="N",
                        help="draw the first N images only (default: all)")
    return parser


def training_records(cfg, drop_unannotated):
    """(dataset name, detectron2 dataset dict) of every image of DATASETS.TRAIN, in order;
    boxes in the dicts are in their ``bbox_mode`` (XYWH_ABS for COCO json)."""
    if not cfg.DATASETS.TRAIN:
        raise SetupError("DATASETS.TRAIN is empty: name the datasets to draw in the config")
    for name in cfg.DATASETS.TRAIN:
        records = load_dataset_dicts(name)
        if drop_unannotated:
            records = filter_images_with_only_crowd_annotations(records)
        for record in records:
            yield name, record


def draw_annotations(record, metadata):
    """HWC uint8 RGB image of the record with its annotations (boxes, class names)."""
    image = read_input_image(record["file_name"], "RGB")
    return Visualizer(image, metadata).draw_dataset_dict(record).get_image()


class MapperDrawing:
    """Draws what ``DetrDatasetMapper(cfg, is_train=True)`` makes of a record."""

    def __init__(self, cfg):
        self.mapper = DetrDatasetMapper(cfg, is_train=True)
        self.image_format = cfg.INPUT.FORMAT

    def __call__(self, record, metadata):
        """HWC uint8 RGB augmented image with its ``gt_boxes`` (xyxy absolute pixels of the
        augmented image) labelled with the class names, and its ``gt_masks`` (MODEL.MASK_ON)."""
        try:
            mapped = self.mapper(record)
        except (OSError, ValueError) as error:
            raise UnreadableInput(str(error)) from error
        image = convert_image_to_rgb(mapped["image"].permute(1, 2, 0).numpy(), self.image_format)
        instances = mapped["instances"]
        names = metadata.get("thing_classes")
        labels = [names[c] if names else str(c) for c in instances.gt_classes.tolist()]
        masks = instances.gt_masks if instances.has("gt_masks") else None
        return Visualizer(image, metadata).overlay_instances(boxes=instances.gt_boxes, labels=labels,
                                                             masks=masks).get_image()


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    cfg = build_config(args.config_file, args.opts, all_datasets_registered=False)
    if args.source == "dataloader":
        seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)
        draw = MapperDrawing(cfg)
    else:
        draw = draw_annotations
    drop_unannotated = args.source == "dataloader" and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    records = list(itertools.islice(training_records(cfg, drop_unannotated), args.num))
    output_paths = OutputPaths(make_output_folder(args.output_dir))
    failures = []
    for name, record in tqdm(records, desc=args.source, unit="image", disable=len(records) < 2):
        try:
            drawing = draw(record, MetadataCatalog.get(name))
        except UnreadableInput as error:
            logger.warning(f"Skipped {record['file_name']}: {error}")
            failures.append(record["file_name"])
            continue
        image_name = os.path.basename(record["file_name"])
        write_png(output_paths.path_for(f"{name}_{image_name}", ".png"), drawing)
    logger.info(f"Drew {len(records) - len(failures)} images into {args.output_dir}")
    if failures:
        logger.error(f"{len(failures)} of {len(records)} images could not be read: {', '.join(failures)}")
        return EXIT_INPUT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
