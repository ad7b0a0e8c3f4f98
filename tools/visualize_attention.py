#!/usr/bin/env python
"""Draw what a trained DETR attends to: decoder attention per detection, encoder self-attention.

    python tools/visualize_attention.py --config-file CFG --input PATH [PATH ...] --output DIR \\
        [--confidence-threshold 0.5] [--points "x,y;x,y"] [--per-head] [--panel-size 384] \\
        [--opts KEY VALUE ...]

PATH: image files, folders (the images directly inside) or glob patterns (quote them).
Into DIR goes one grid per image, ``<name>.png``: the detections scoring at least the
threshold drawn by detectron2's Visualizer, then for each of them the last decoder layer's
cross-attention of its query as a heat map over the image; below, for each point, the last
encoder layer's self-attention from the feature cell holding it. Points are pixels (x, y)
of the input images; by default the box centres of the 3 best detections, duplicates
skipped (the image centre when nothing is detected). Maps are averaged over the attention
heads; ``--per-head`` draws one panel per head instead. Panels show the image scaled to a
longer side of ``--panel-size`` pixels. MODEL.WEIGHTS is given through ``--opts``.

Exit status: 0; 1 if some input could not be read (each is reported, the others are
processed); 2 on a setup problem (config, weights, --points), reported in one line.
"""
import argparse
import logging
import sys

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from detectron2.data.detection_utils import convert_image_to_rgb

from detr_d2.analysis import detections_with_attention
from detr_d2.engine import build_config
from detr_d2.utils.attention_drawing import (
    PANEL_SIDE,
    attention_grid,
    check_points_inside,
    confident_queries,
    default_points,
    parse_points,
)
from detr_d2.utils.inputs import InputFailure, OutputPaths, UnreadableInput, expand_inputs, is_video, read_input_image
from detr_d2.utils.outputs import write_png
from detr_d2.utils.predictor import BatchPredictor
from detr_d2.utils.tool_setup import (
    EXIT_INPUT_FAILED,
    check_class_count,
    fraction,
    make_output_folder,
    metadata_with_class_names,
    positive_int,
    run_tool,
    setup_tool_logging,
)

logger = logging.getLogger("detectron2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config of the model")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawings")
    parser.add_argument("--confidence-threshold", type=fraction, default=0.5,
                        help="draw detections scoring at least this (default: %(default)s)")
    parser.add_argument("--points", metavar='"x,y;x,y"',
                        help="pixels to draw the encoder self-attention from (default: the box "
                             "centres of the 3 best detections)")
    parser.add_argument("--per-head", action="store_true", help="one map per attention head, not their mean")
    parser.add_argument("--panel-size", type=positive_int, default=PANEL_SIDE, metavar="PIXELS",
                        help="longer side of each panel of the grid (default: %(default)s)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read MODEL.WEIGHTS with full unpickling, which runs code from the file: "
                             "only for files whose origin you trust")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides, e.g. --opts MODEL.WEIGHTS model.pth MODEL.DEVICE cpu")
    return parser


def draw_image(predictor, path, args, points, class_names):
    """The attention grid (HWC uint8 RGB) of the image ``path``; raises UnreadableInput."""
    image = read_input_image(path, predictor.image_format)
    height, width = image.shape[:2]
    if points:
        check_points_inside(points, height, width, path)
    [(instances, attention)] = detections_with_attention(predictor.model, [predictor.model_input(image)])
    queries = confident_queries(instances, args.confidence_threshold)
    rgb = convert_image_to_rgb(image, predictor.image_format)
    return attention_grid(rgb, instances, queries, attention,
                          points or default_points(instances[queries], height, width), class_names, args.per_head,
                          args.panel_size)


def main(argv=None):
    args = build_parser().parse_args(argv)
    points = parse_points(args.points) if args.points is not None else None
    setup_tool_logging()
    cfg = build_config(args.config_file, args.opts, all_datasets_registered=False)
    metadata = metadata_with_class_names(cfg)
    paths, failures = expand_inputs(args.input)
    failures += [InputFailure(path, "a video: this tool draws images") for path in filter(is_video, paths)]
    predictor = BatchPredictor(cfg, trust_pickle=args.trust_pickle)
    check_class_count(metadata, predictor.num_classes)
    output_paths = OutputPaths(make_output_folder(args.output), paths)
    written = 0
    for path in [path for path in paths if not is_video(path)]:
        try:
            grid = draw_image(predictor, path, args, points, metadata.get("thing_classes"))
        except UnreadableInput as error:
            failures.append(InputFailure(path, str(error)))
            continue
        write_png(output_paths.path_for(path, ".png"), grid)
        written += 1
    for failure in failures:
        logger.error(f"Skipped {failure.path}: {failure.reason}")
    logger.info(f"{written} attention drawings written to {args.output}")
    return EXIT_INPUT_FAILED if failures else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
