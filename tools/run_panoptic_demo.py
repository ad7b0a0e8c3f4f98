#!/usr/bin/env python
"""The synthetic panoptic demo (``make demo-panoptic``): a panoptic DETR from the bundled detector.

    python tools/run_panoptic_demo.py [--output output/demo_panoptic] [--data-dir DIR]
                                      [--splits train:2000,val:200] [--seed N] [--images N]
                                      [--box-opts KEY VALUE ...] [--mask-opts KEY VALUE ...]

Steps, each a run of the project's own command-line tools:

1. ``datasets/prepare_shapes.py --preset panoptic``: the panoptic shapes (the 6 pretraining
   shapes as things on sky / ground / water stuff, void borders, some crowds) in
   COCO-panoptic format, into ``--data-dir`` (default ``datasets/shapes_panoptic``; cached).
2. The start: the bundled checkpoint ``checkpoints/shapes_detr_tiny.pth`` with its class
   head carried over by name (``checkpoint.class_head_by_name``): the 6 shapes keep their
   rows, sky / ground / water get fresh ones; written to ``<output>/start.pth``.
   ``tools/train_net.py`` with ``configs/shapes/detr_tiny_panoptic_boxes.yaml`` fine-tunes it
   to detect every segment, things and stuff, as boxes.
3. ``tools/train_net.py`` with ``configs/shapes/detr_tiny_panoptic.yaml``: that detector
   frozen (MODEL.DETR.FROZEN_WEIGHTS), the mask head trained on every segment's mask;
   evaluated with detectron2's COCOPanopticEvaluator (PQ, SQ, RQ: all, things, stuff).
4. ``tools/demo.py``: the panoptic output drawn with detectron2's Visualizer on
   validation images (PNG files, at 4x the 128-px images).
5. A summary: PQ / SQ / RQ, where everything is, the time of each step.

The dataset paths are given to train_net as ``DATASETS.REGISTER_COCO_PANOPTIC`` on its
command line, so ``--data-dir`` may be anywhere. ``--seed`` goes to both training runs.
"""
import argparse
import glob
import json
import os
import sys
import time

import torch

from detr_d2.checkpoint.class_head import class_head_by_name
from detr_d2.checkpoint.io import atomic_torch_save
from detr_d2.data.coco_panoptic import panoptic_metadata, read_panoptic_json
from detr_d2.data.shapes import PRESETS
from detr_d2.utils.demo_steps import run_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOX_CONFIG = "configs/shapes/detr_tiny_panoptic_boxes.yaml"
MASK_CONFIG = "configs/shapes/detr_tiny_panoptic.yaml"
DATA = "datasets/shapes_panoptic"
SPLITS = "train:2000,val:200"
DRAW_SCALE = "4"
BUNDLED = "checkpoints/shapes_detr_tiny.pth"
BUNDLED_CLASSES = PRESETS["pretrain"]  # the bundled detector's classes, in its head's row order


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo_panoptic", metavar="DIR",
                        help="folder for both runs and the drawings (default: output/demo_panoptic)")
    parser.add_argument("--data-dir", default=DATA, metavar="DIR", help=f"the panoptic shapes (default: {DATA})")
    parser.add_argument("--splits", default=SPLITS, metavar="NAME:COUNT,...",
                        help=f"image counts of the train and val splits (default: {SPLITS})")
    parser.add_argument("--seed", type=int, default=0, help="SEED of both training runs (default: 0)")
    parser.add_argument("--images", type=int, default=8, metavar="N",
                        help="validation images to draw (default: 8)")
    parser.add_argument("--box-opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides of the box stage")
    parser.add_argument("--mask-opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides of the mask stage")
    return parser


def write_start_checkpoint(data_dir, path, timings):
    """The bundled checkpoint with its class head carried over to the panoptic classes by name."""
    start = time.perf_counter()
    checkpoint = torch.load(os.path.join(REPO, BUNDLED), map_location="cpu", weights_only=True)
    categories = read_panoptic_json(os.path.join(REPO, data_dir, "annotations", "panoptic_train.json"))["categories"]
    classes = panoptic_metadata(categories)["thing_classes"]
    checkpoint["model"], kept = class_head_by_name(checkpoint["model"], list(BUNDLED_CLASSES), classes)
    os.makedirs(os.path.dirname(os.path.join(REPO, path)), exist_ok=True)
    atomic_torch_save(checkpoint, os.path.join(REPO, path))
    print(f"\n[demo] start: {BUNDLED} with the class rows of {', '.join(kept)} kept, fresh rows for "
          f"{', '.join(c for c in classes if c not in kept)} -> {path}", flush=True)
    timings["start checkpoint"] = time.perf_counter() - start


def dataset_overrides(data_dir):
    """train_net arguments registering ``data_dir``'s splits under the names the configs use."""
    register = tuple((f"shapes_panoptic_{split}", f"{data_dir}/annotations/panoptic_{split}.json",
                      f"{data_dir}/panoptic/{split}", f"{data_dir}/images/{split}") for split in ("train", "val"))
    return ["DATASETS.REGISTER_COCO_PANOPTIC", repr(register)]


def panoptic_evaluations(run_dir):
    """The rows of ``run_dir/metrics.json`` with PQ, in order."""
    with open(os.path.join(REPO, run_dir, "metrics.json")) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    evaluated = [row for row in rows if "panoptic_seg/PQ" in row]
    if not evaluated:
        sys.exit(f"[demo] no panoptic evaluation found in {run_dir}/metrics.json")
    return evaluated


def pq_line(row):
    """One evaluation: PQ, SQ, RQ of all segments, things, stuff."""
    parts = []
    for title, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st")):
        values = " ".join(f"{row[f'panoptic_seg/{m}{suffix}']:5.1f}" for m in ("PQ", "SQ", "RQ"))
        parts.append(f"{title} {values}")
    return f"[demo]   iteration {row['iteration']:>5}: PQ SQ RQ  " + " | ".join(parts)


def summary(args, mask_dir, pictures_dir, evaluated, timings):
    last = evaluated[-1]
    lines = ["", "=" * 72,
             f"[demo] panoptic DETR on the panoptic shapes from the bundled detector (seed {args.seed})",
             f"[demo] PQ {last['panoptic_seg/PQ']:.1f}  SQ {last['panoptic_seg/SQ']:.1f}  "
             f"RQ {last['panoptic_seg/RQ']:.1f}  (COCOPanopticEvaluator, {args.data_dir} val split)",
             "[demo] evaluations of the mask stage:", *map(pq_line, evaluated),
             f"[demo] runs: {args.output}/boxes, {mask_dir} (config.yaml, model_final.pth, metrics.json)",
             f"[demo] panoptic output drawn with detectron2's Visualizer: {pictures_dir}/*.png"]
    lines += [f"[demo]   {title}: {seconds / 60:.1f} min" for title, seconds in timings.items()]
    lines.append(f"[demo] total: {sum(timings.values()) / 60:.1f} min")
    print("\n".join(lines + ["=" * 72]), flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    python = sys.executable
    box_dir, mask_dir = os.path.join(args.output, "boxes"), os.path.join(args.output, "masks")
    pictures_dir = os.path.join(args.output, "predictions")
    data = dataset_overrides(args.data_dir)
    timings = {}
    run_step("generate the panoptic shapes", [python, "datasets/prepare_shapes.py", "--preset", "panoptic",
                                              "--splits", args.splits, "--output", args.data_dir], timings, REPO)
    start = os.path.join(args.output, "start.pth")
    write_start_checkpoint(args.data_dir, start, timings)
    run_step("stage 1: boxes of things and stuff", [
        python, "tools/train_net.py", "--config-file", BOX_CONFIG, *data, "SEED", str(args.seed),
        "MODEL.WEIGHTS", start, "OUTPUT_DIR", box_dir, *args.box_opts], timings, REPO)
    run_step("stage 2: mask head on the frozen detector, PQ", [
        python, "tools/train_net.py", "--config-file", MASK_CONFIG, *data, "SEED", str(args.seed),
        "MODEL.DETR.FROZEN_WEIGHTS", os.path.join(box_dir, "model_final.pth"), "OUTPUT_DIR", mask_dir,
        *args.mask_opts], timings, REPO)
    val_images = sorted(glob.glob(os.path.join(REPO, args.data_dir, "images", "val", "*.png")))[:args.images]
    run_step("draw the panoptic output", [
        python, "tools/demo.py", "--config-file", os.path.join(mask_dir, "config.yaml"), "--input", *val_images,
        "--output", pictures_dir, "--draw-scale", DRAW_SCALE,
        "--opts", "MODEL.WEIGHTS", os.path.join(mask_dir, "model_final.pth")], timings, REPO)
    summary(args, mask_dir, pictures_dir, panoptic_evaluations(mask_dir), timings)


if __name__ == "__main__":
    main()
