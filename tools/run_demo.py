#!/usr/bin/env python
"""The embedded demo (``make demo``): fine-tune the bundled shapes DETR on a new 2-class set.

    python tools/run_demo.py [--output output/demo] [--config-file CFG] [--data-dir DIR]
                             [--splits train:2000,val:200] [--images N] [--masks] [[--opts] KEY VALUE ...]

Steps, each a run of the project's own command-line tools (so the demo shows what a user
would type):

1. ``datasets/prepare_shapes.py --preset custom``: the "custom" data, stars and crosses
   (classes the bundled model never saw), into ``--data-dir`` (default
   ``datasets/shapes_custom``; cached: skipped when its manifest matches).
2. ``tools/train_net.py`` with ``configs/shapes/detr_tiny_finetune_custom.yaml``: loads the
   bundled checkpoint ``checkpoints/shapes_detr_tiny.pth`` (its class head does not fit
   the 2 classes and is skipped, the log says so), fine-tunes, and evaluates every 1000
   iterations and at the end on the held-out validation split: COCOEvaluator's AP and
   DETR's criterion on it (validation losses).
3. ``tools/demo.py``: draws the fine-tuned model's detections on validation images with
   detectron2's Visualizer (PNG files, drawn at 4x the 128-px images; scores from 0.5, from
   0.3 for the sigmoid-scored Deformable DETR and DINO).
4. ``tools/plot_logs.py``: the training curves with the AP and validation losses.
5. A summary: the evaluations (AP / AP50, validation loss), where everything is, and the
   time of each step.

``make demo-dino`` runs the same steps on the DINO twin: ``--config-file
configs/shapes/dino_tiny_finetune_custom.yaml`` starts from ``checkpoints/shapes_dino_tiny.pth``.

Extra ``KEY VALUE`` pairs go to train_net (e.g. ``SOLVER.MAX_ITER 500`` for a quick look).

``--masks`` (``make demo-masks``, after ``make demo``): the reference's second stage instead
of steps 2-4. ``configs/shapes/detr_tiny_masks_custom.yaml`` loads the fine-tuned detector of
``<output>/finetune`` through ``MODEL.DETR.FROZEN_WEIGHTS``, freezes it and trains the mask
head alone on the shapes' instance masks, evaluating COCO bbox and segm; the masks are drawn
into ``<output>/masks_predictions``.
"""
import glob
import json
import os
import sys

import yaml
from detr_d2.utils.demo_steps import run_step
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/shapes/detr_tiny_finetune_custom.yaml"
CUSTOM_DATA = "datasets/shapes_custom"
CUSTOM_SPLITS = "train:2000,val:200"
MASKS_CONFIG = "configs/shapes/detr_tiny_masks_custom.yaml"
MODEL_NAMES = {"Detr": "DETR", "GroupDetr": "Group DETR", "DeformableDetr": "Deformable DETR", "Dino": "DINO"}
# Score threshold of the drawings: the sigmoid top-k models' per-class scores run lower
# than DETR's softmax ones (the fine-tuned shapes DINO scores found shapes from 0.38).
DRAW_THRESHOLDS = {"DeformableDetr": "0.3", "Dino": "0.3"}
DRAW_SCALE = "4"  # the 128-px images drawn at 512 px: labels no longer cover the objects


def build_parser():
    parser = ToolArgumentParser(__doc__)
    parser.add_argument("--output", default="output/demo", metavar="DIR",
                        help="folder for the run, pictures and curves (default: output/demo)")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"fine-tuning config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--data-dir", default=CUSTOM_DATA, metavar="DIR",
                        help=f"where the custom data is generated (default: {CUSTOM_DATA})")
    parser.add_argument("--splits", default=CUSTOM_SPLITS, metavar="NAME:COUNT,...",
                        help=f"image counts of the train and val splits (default: {CUSTOM_SPLITS})")
    parser.add_argument("--images", type=int, default=8, metavar="N",
                        help="validation images to draw predictions on (default: 8)")
    parser.add_argument("--masks", action="store_true",
                        help=f"after the fine-tuning: train the mask head on its frozen detector ({MASKS_CONFIG})")
    add_config_overrides(parser, example="SOLVER.MAX_ITER 500 (of the fine-tuning run)")
    return parser


def evaluations(run_dir, task="bbox"):
    """The evaluation rows (with "<task>/AP") of ``run_dir/metrics.json``, in order."""
    with open(os.path.join(run_dir, "metrics.json")) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    evaluated = [row for row in rows if f"{task}/AP" in row]
    if not evaluated:
        sys.exit(f"[demo] no evaluation found in {run_dir}/metrics.json")
    return evaluated


def evaluation_line(row):
    """One evaluation: iteration, AP, AP50 and (TEST.EVAL_LOSSES) the validation loss."""
    loss = f"  val/loss {row['val/loss']:.3f}  val/class_error {row['val/class_error']:.1f}" if "val/loss" in row else ""
    return f"[demo]   iteration {row['iteration']:>5}: AP {row['bbox/AP']:5.1f}  AP50 {row['bbox/AP50']:5.1f}{loss}"


def dataset_overrides(data_dir):
    """train_net arguments registering ``data_dir``'s train/val splits under the names the
    demo config trains and evaluates on."""
    splits = {split: (f"{data_dir}/annotations/{split}.json", f"{data_dir}/images/{split}")
              for split in ("train", "val")}
    register = tuple((f"shapes_custom_{split}",) + paths for split, paths in splits.items())
    return ["DATASETS.REGISTER_COCO", repr(register)]


def meta_architecture(run_dir):
    """MODEL.META_ARCHITECTURE of ``run_dir/config.yaml``."""
    with open(os.path.join(run_dir, "config.yaml")) as file:
        return yaml.safe_load(file)["MODEL"]["META_ARCHITECTURE"]


def model_name(run_dir):
    """The family name of the model ``run_dir`` trained."""
    name = meta_architecture(run_dir)
    return MODEL_NAMES.get(name, name)


def summary(args, run_dir, pictures_dir, curves, evaluated, timings):
    """The closing lines: the evaluations (the last one's AP first), where the results are,
    time per step."""
    last = evaluated[-1]
    lines = ["", "=" * 72, f"[demo] {model_name(os.path.join(REPO, run_dir))} fine-tuned on the custom shapes "
             "(star, cross), bundled checkpoint as the start",
             f"[demo] bbox AP {last['bbox/AP']:.1f}  AP50 {last['bbox/AP50']:.1f}  "
             f"(COCOEvaluator, {args.data_dir} val split)",
             "[demo] evaluations during fine-tuning (validation split):",
             *map(evaluation_line, evaluated),
             f"[demo] run (config.yaml, model_final.pth, metrics.json, log.txt): {run_dir}",
             f"[demo] predictions drawn with detectron2's Visualizer: {pictures_dir}/*.png",
             f"[demo] training and validation curves: {curves}"]
    lines += [f"[demo]   {title}: {seconds / 60:.1f} min" for title, seconds in timings.items()]
    lines.append(f"[demo] total: {sum(timings.values()) / 60:.1f} min")
    print("\n".join(lines + ["=" * 72]), flush=True)


def mask_stage(args, detector, timings):
    """Train the mask head on the frozen ``detector`` (a model_final.pth), draw the masks,
    print box and mask AP."""
    if not os.path.isfile(os.path.join(REPO, detector)):
        sys.exit(f"[demo] {detector} is missing: run `make demo` first (the mask head trains on its detector)")
    python, run_dir = sys.executable, os.path.join(args.output, "masks")
    pictures_dir = os.path.join(args.output, "masks_predictions")
    run_step("train the mask head on the frozen detector", [
        python, "tools/train_net.py", "--config-file", MASKS_CONFIG, *dataset_overrides(args.data_dir),
        "MODEL.DETR.FROZEN_WEIGHTS", detector, "OUTPUT_DIR", run_dir, *args.opts], timings, REPO)
    val_images = sorted(glob.glob(os.path.join(REPO, args.data_dir, "images", "val", "*.png")))[:args.images]
    run_step("draw masks", [python, "tools/demo.py", "--config-file", os.path.join(run_dir, "config.yaml"),
                            "--input", *val_images, "--output", pictures_dir, "--draw-scale", DRAW_SCALE,
                            "--opts", "MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth")], timings, REPO)
    rows = evaluations(os.path.join(REPO, run_dir), "segm")
    lines = ["", "=" * 72, "[demo] mask head trained on the frozen fine-tuned detector (custom shapes)",
             *(f"[demo]   iteration {row['iteration']:>5}: mask AP {row['segm/AP']:5.1f}  AP50 {row['segm/AP50']:5.1f}"
               f"   box AP {row['bbox/AP']:5.1f}  AP50 {row['bbox/AP50']:5.1f}" for row in rows),
             f"[demo] run: {run_dir}", f"[demo] masks drawn with detectron2's Visualizer: {pictures_dir}/*.png"]
    lines += [f"[demo]   {title}: {seconds / 60:.1f} min" for title, seconds in timings.items()]
    print("\n".join(lines + ["=" * 72]), flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    python = sys.executable
    run_dir = os.path.join(args.output, "finetune")
    pictures_dir = os.path.join(args.output, "predictions")
    curves = os.path.join(args.output, "curves.png")
    timings = {}
    run_step("generate the custom data", [python, "datasets/prepare_shapes.py", "--preset", "custom",
                                          "--splits", args.splits, "--output", args.data_dir], timings, REPO)
    if args.masks:
        mask_stage(args, os.path.join(run_dir, "model_final.pth"), timings)
        return
    run_step("fine-tune and evaluate", [python, "tools/train_net.py", "--config-file", args.config_file,
                                        *dataset_overrides(args.data_dir), "OUTPUT_DIR", run_dir, *args.opts],
             timings, REPO)
    val_images = sorted(glob.glob(os.path.join(REPO, args.data_dir, "images", "val", "*.png")))[:args.images]
    threshold = DRAW_THRESHOLDS.get(meta_architecture(os.path.join(REPO, run_dir)), "0.5")
    run_step("draw predictions", [python, "tools/demo.py", "--config-file", os.path.join(run_dir, "config.yaml"),
                                  "--input", *val_images, "--output", pictures_dir, "--draw-scale", DRAW_SCALE,
                                  "--confidence-threshold", threshold,
                                  "--opts", "MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth")], timings, REPO)
    run_step("plot the training curves", [python, "tools/plot_logs.py", run_dir, "--output", curves], timings, REPO)
    summary(args, run_dir, pictures_dir, curves, evaluations(os.path.join(REPO, run_dir)), timings)


if __name__ == "__main__":
    main()
