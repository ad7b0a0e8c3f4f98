#!/usr/bin/env python
"""Export a trained DETR, Deformable DETR or DINO to ONNX or TorchScript, verified on request.

    python tools/export_model.py --config-file CFG --format {onnx,torchscript} --output DIR \\
        [--sample-image IMG] [--verify] [--batch-size N] [--opts] MODEL.WEIGHTS W [KEY VALUE ...]

Writes DIR/model.onnx (or DIR/model.ts) and DIR/export.json (inputs and outputs with
names and shapes, pixel mean/std and channel order, the test-time resize rule, class
names and ids, the demo's score threshold, the exporter and, with --verify, the
differences measured). The graph takes a padded batch of normalised images and the
unpadded size of each (batch, height and width dynamic) and returns per query the class
logits and the boxes (cx, cy, w, h normalised by the unpadded size). The model is built
on the CPU with its fast paths off (the plain computation; oneDNN's prepacked ops cannot
be exported) and traced on a batch of --batch-size images of different sizes (default 2,
at least 2 so that the batch stays dynamic; the --sample-image resized, else random images).

--verify runs the written file (onnxruntime / torch.jit.load) and the model as the tools
run it on three sizes (not multiples of 32, both orientations) and on a mixed-size batch,
prints the largest differences of boxes, scores and labels, and fails (exit status 1)
when they exceed the tolerance (boxes 1e-4 of the image side, scores 1e-4, labels equal).
Run the ONNX export without torch: tools/predict_onnx.py.

Exit status: 0; 1 if the verification failed (the files are kept, export.json says so);
2 on a setup problem (config, weights, unsupported model, arguments), in one line.
"""
import logging
import os
import sys

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)

from detr_d2.engine import build_config
from detr_d2.errors import SetupError
from detr_d2.export import ExportRequest, check_exportable, export_model
from detr_d2.utils.inputs import UnreadableInput, read_input_image
from detr_d2.utils.predictor import build_inference_model
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_arguments
from detr_d2.utils.tool_setup import (
    check_class_count,
    make_output_folder,
    metadata_with_class_names,
    positive_int,
    run_tool,
    setup_tool_logging,
)
from detr_d2_deploy.spec import EXPORT_FILE, MODEL_FILES

EXIT_VERIFICATION_FAILED = 1

logger = logging.getLogger("detectron2")


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser, example="MODEL.WEIGHTS output/model_final.pth")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the model and export.json")
    parser.add_argument("--sample-image", metavar="IMG",
                        help="image to trace and verify with (resized to each size); default: random images")
    parser.add_argument("--verify", action="store_true",
                        help="compare the exported model with eager PyTorch; fail above the tolerance")
    parser.add_argument("--batch-size", type=positive_int, default=2,
                        help="images of different sizes in the traced and verified batch (default: %(default)s)")
    return parser


def export_config(config_file, opts):
    """The checked config, on the CPU (export runs there), with MODEL.WEIGHTS given."""
    cfg = build_config(config_file, [*opts, "MODEL.DEVICE", "cpu"], all_datasets_registered=False)
    check_exportable(cfg)
    if not cfg.MODEL.WEIGHTS:
        raise SetupError("MODEL.WEIGHTS is empty: give the trained checkpoint to export, e.g. "
                         "tools/export_model.py ... MODEL.WEIGHTS output/model_final.pth")
    return cfg


def read_sample_image(path, image_format):
    """The --sample-image as HWC uint8 in INPUT.FORMAT, or None; SetupError if unreadable."""
    if path is None:
        return None
    try:
        return read_input_image(path, image_format)
    except UnreadableInput as error:
        raise SetupError(f"--sample-image {path} cannot be read: {error}") from error


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    cfg = export_config(args.config_file, args.opts)
    metadata = metadata_with_class_names(cfg)
    request = ExportRequest(args.format, make_output_folder(args.output),
                            read_sample_image(args.sample_image, cfg.INPUT.FORMAT), args.verify, args.batch_size)
    model = build_inference_model(cfg)
    check_class_count(metadata, model.num_classes)
    _, passed = export_model(model, cfg, args.config_file, metadata, request)
    logger.info(f"Wrote {os.path.join(args.output, MODEL_FILES[args.format])} and "
                f"{os.path.join(args.output, EXPORT_FILE)}")
    return 0 if passed else EXIT_VERIFICATION_FAILED


if __name__ == "__main__":
    sys.exit(run_tool(main))
