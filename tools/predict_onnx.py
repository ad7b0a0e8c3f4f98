#!/usr/bin/env python
"""Run a model exported to ONNX on images, with numpy, onnxruntime and Pillow only.

    python tools/predict_onnx.py --model-dir DIR --input PATH [PATH ...] --output OUTDIR \\
        [--confidence-threshold T] [--batch-size N]

DIR is a folder written by ``tools/export_model.py --format onnx`` (model.onnx and
export.json). PATH: image files, folders (the images directly inside) or glob patterns
(quote them), as for tools/demo.py. Each image is read (EXIF orientation applied), resized
with the export's test-time rule, normalised and batched --batch-size at a time, as
tools/demo.py does; into OUTDIR goes ``predictions.json`` in tools/demo.py's format
({"file_name", "category_id", "category_name", "bbox": [x, y, w, h] in pixels of the
original image, "score", with a mask export also "segmentation" as COCO RLE},
detections scoring at least the threshold; default: the
export's ``score_threshold``, tools/demo.py's default) and, where OpenCV is installed, a
``<name>.png`` per image with the kept boxes drawn.

Nothing here imports torch or detectron2. onnxruntime runs OMP_NUM_THREADS intra-op
threads when that is set, else its default (one per physical core).

Exit status: 0; 1 if some input could not be read (each is reported, the others are
processed); 2 on a setup problem (model folder, arguments), reported in one line.
"""
import argparse
import logging
import os
import sys

from detr_d2_deploy.predictor import OnnxDetrPredictor
from detr_d2_deploy.inputs import OutputPaths, expand_inputs
from detr_d2_deploy.outputs import write_json
from detr_d2_deploy.run import PredictionRun, fraction, make_output_folder, positive_int, run_tool

PREDICTIONS_FILE = "predictions.json"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, metavar="DIR", help="folder written by tools/export_model.py")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, metavar="OUTDIR", help="folder for the results")
    parser.add_argument("--confidence-threshold", type=fraction, default=None,
                        help="keep detections scoring at least this (default: the export's score_threshold)")
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="images per forward pass (default: %(default)s)")
    return parser


def threads_from_environment():
    """OMP_NUM_THREADS as an int when set to one, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    predictor = OnnxDetrPredictor(args.model_dir, threads_from_environment())
    threshold = predictor.spec.score_threshold if args.confidence_threshold is None else args.confidence_threshold
    paths, pattern_failures = expand_inputs(args.input)
    output_paths = OutputPaths(make_output_folder(args.output), paths, reserved={PREDICTIONS_FILE})
    run = PredictionRun(predictor, threshold, args.batch_size, output_paths)
    for failure in pattern_failures:
        run.fail(failure.path, failure.reason)
    run.run_on(paths)
    predictions_path = os.path.join(args.output, PREDICTIONS_FILE)
    write_json(predictions_path, run.records)
    return run.report(len(paths) + len(pattern_failures), predictions_path)


if __name__ == "__main__":
    sys.exit(run_tool(main))
