#!/usr/bin/env python
"""Draw what a trained model attends to, per detection and from chosen points of the image.

    python tools/visualize_attention.py --config-file CFG --input PATH [PATH ...] --output DIR \\
        [--confidence-threshold 0.5] [--points "x,y;x,y"] [--per-head] [--panel-size 384] \\
        [--levels "0,1"] [[--opts] KEY VALUE ...]

PATH: image files, folders (the images directly inside) or glob patterns (quote them).
Into DIR goes one grid per image, ``<name>.png``: the detections scoring at least the
threshold drawn by detectron2's Visualizer, then for each of them what its query attends
to in the last decoder layer; below, for each point, what the last encoder layer attends
to from there. Points are pixels (x, y) of the input images; by default the box centres of
the 3 best detections, duplicates skipped (the image centre when nothing is detected).
Panels show the image scaled to a longer side of ``--panel-size`` pixels. MODEL.WEIGHTS is
given through ``--opts``.

DETR (Detr, GroupDetr): the cross-attention of the detection's query and the encoder
self-attention from the feature cell holding each point, as heat maps averaged over the
attention heads (``--per-head``: one panel per head).
DeformableDetr and Dino: the sampling points of the deformable attention, coloured by
feature level, their area by attention weight, with the query's reference point (and
reference box); the encoder's from the finest level's cell holding each point. All heads
in one panel (``--per-head``: one panel per head); ``--levels`` draws only those levels.

Exit status: 0; 1 if some input could not be read (each is reported, the others are
processed); 2 on a setup problem (config, weights, --points, --levels), reported in one line.
"""
import logging
import sys

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from detectron2.data.detection_utils import convert_image_to_rgb

from detr_d2.analysis import (
    detections_with_attention,
    detections_with_sampling,
    feature_level_count,
    has_sampling_points,
)
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
from detr_d2.utils.sampling_drawing import check_levels, parse_levels, sampling_grid
from detr_d2.utils.tool_arguments import (
    ToolArgumentParser,
    add_confidence_threshold,
    add_config_arguments,
    add_image_inputs,
    add_trust_pickle,
)
from detr_d2.utils.tool_setup import (
    EXIT_INPUT_FAILED,
    check_class_count,
    make_output_folder,
    metadata_with_class_names,
    positive_int,
    run_tool,
    setup_tool_logging,
)

logger = logging.getLogger("detectron2")


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser)
    add_image_inputs(parser)
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawings")
    add_confidence_threshold(parser, help="draw detections scoring at least this")
    parser.add_argument("--points", metavar='"x,y;x,y"',
                        help="pixels to draw the encoder self-attention from (default: the box "
                             "centres of the 3 best detections)")
    parser.add_argument("--per-head", action="store_true",
                        help="one panel per attention head, not the heads together")
    parser.add_argument("--panel-size", type=positive_int, default=PANEL_SIDE, metavar="PIXELS",
                        help="longer side of each panel of the grid (default: %(default)s)")
    parser.add_argument("--levels", metavar='"0,1"',
                        help="DeformableDetr / Dino: draw the sampling points of these feature levels only "
                             "(default: all)")
    add_trust_pickle(parser)
    return parser


def draw_image(predictor, path, args, points, class_names):
    """The attention grid (HWC uint8 RGB) of the image ``path``; raises UnreadableInput."""
    image = read_input_image(path, predictor.image_format)
    height, width = image.shape[:2]
    if points:
        check_points_inside(points, height, width, path)
    rgb = convert_image_to_rgb(image, predictor.image_format)
    model_input = predictor.model_input(image)
    if has_sampling_points(predictor.model):
        [(instances, queries, sampling)] = detections_with_sampling(predictor.model, [model_input])
        detections = confident_queries(instances, args.confidence_threshold)
        return sampling_grid(rgb, instances, detections, queries, sampling,
                             points or default_points(instances[detections], height, width), class_names,
                             args.per_head, args.panel_size, args.levels)
    [(instances, attention)] = detections_with_attention(predictor.model, [model_input])
    queries = confident_queries(instances, args.confidence_threshold)
    return attention_grid(rgb, instances, queries, attention,
                          points or default_points(instances[queries], height, width), class_names, args.per_head,
                          args.panel_size)


def main(argv=None):
    args = build_parser().parse_args(argv)
    points = parse_points(args.points) if args.points is not None else None
    args.levels = parse_levels(args.levels) if args.levels is not None else None
    setup_tool_logging()
    cfg = build_config(args.config_file, args.opts, all_datasets_registered=False)
    metadata = metadata_with_class_names(cfg)
    paths, failures = expand_inputs(args.input)
    failures += [InputFailure(path, "a video: this tool draws images") for path in filter(is_video, paths)]
    predictor = BatchPredictor(cfg, trust_pickle=args.trust_pickle)
    check_class_count(metadata, predictor.num_classes)
    if args.levels is not None:
        check_levels(args.levels, feature_level_count(predictor.model), type(predictor.model).__name__)
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
