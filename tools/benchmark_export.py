#!/usr/bin/env python
"""Export a config's model (random weights) to ONNX, verify it, and time onnxruntime
against the eager model as the tools run it (fast paths as configured).

    python tools/benchmark_export.py --config-file CFG [--input-size 800x1066] [--rounds 7] \\
        [--threads 2] [--batch-size 2] [--output DIR] [[--opts] KEY VALUE ...]

The model is built on the CPU with random weights (seeded; timings and the exported
graph do not depend on the values), exported as tools/export_model.py does (into DIR, or
a temporary folder) and verified on three sizes and a mixed batch of --batch-size images
(the same table as ``export_model.py --verify``). Then one random image of --input-size
runs through onnxruntime and through the eager model in turns, --threads threads each
(torch.set_num_threads and onnxruntime's intra-op threads), one untimed warm-up each;
printed: medians, extremes, the ratio per round, and the load average before and after.

Exit status: 0; 1 if the verification failed; 2 on a setup problem, in one line.
"""
import logging
import os
import sys
import tempfile

import torch

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from detr_d2.engine import build_config
from detr_d2.engine.build import build_model
from detr_d2.export import ExportRequest, check_exportable, export_model
from detr_d2.export.speed import time_in_turns
from detr_d2.export.verification import verification_images
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_arguments
from detr_d2.utils.tool_setup import input_size, metadata_with_class_names, positive_int, run_tool, setup_tool_logging
from detr_d2_deploy.predictor import onnx_session
from detr_d2_deploy.spec import MODEL_FILES, ExportSpec

EXIT_VERIFICATION_FAILED = 1
SEED = 0

logger = logging.getLogger("detectron2")


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser, help="config of the model", example="MODEL.DETR.NUM_OBJECT_QUERIES 300")
    parser.add_argument("--input-size", type=input_size, default=(800, 1066), metavar="HxW",
                        help="network-input size of the timed image (default: 800x1066)")
    parser.add_argument("--rounds", type=positive_int, default=7, help="timed calls of each side (default: 7)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count(),
                        help="threads of each side (default: the number of cores)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="images in the verified mixed batch")
    parser.add_argument("--output", metavar="DIR", help="keep the export here (default: a temporary folder)")
    return parser


def run(args, output_dir):
    """Export, verify, time; the exit status."""
    cfg = build_config(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"], all_datasets_registered=False)
    check_exportable(cfg)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model = build_model(cfg).eval()
    request = ExportRequest("onnx", output_dir, verify=True, batch_size=args.batch_size)
    description, passed = export_model(model, cfg, args.config_file, metadata_with_class_names(cfg), request)
    session = onnx_session(os.path.join(output_dir, MODEL_FILES["onnx"]), args.threads)
    image = verification_images([args.input_size], seed=SEED + 1)[0]
    logger.info(f"Timing one {args.input_size[0]}x{args.input_size[1]} image, {args.threads} thread(s) each, "
                f"{args.rounds} rounds")
    timings = time_in_turns(model, session, ExportSpec.from_json(description), image, args.rounds)
    for line in timings.summary_lines():
        logger.info(line)
    return 0 if passed else EXIT_VERIFICATION_FAILED


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        return run(args, args.output)
    with tempfile.TemporaryDirectory() as output_dir:
        return run(args, output_dir)


if __name__ == "__main__":
    sys.exit(run_tool(main))
