#!/usr/bin/env python
"""Count the parameters and FLOPs of a config's model, per top-level module.

    python tools/analyze_model.py --config-file CFG [--input-size HxW] [--json OUT] \\
        [[--opts] KEY VALUE ...]

The model is built from the config on the CPU (no weights are loaded: counts do not
depend on them) and traced by fvcore's FlopCountAnalysis in inference mode on one
H x W image, the size the network sees (no test-time resize). Without --input-size, the
size a 640x480 image takes under the config's test-time resize (INPUT.MIN_SIZE_TEST,
INPUT.MAX_SIZE_TEST; 800x1067 for DETR's configs). fvcore counts one fused
multiply-add as one flop (so "GFLOPs" here are GMACs, as in detectron2's model zoo):
convolutions, linear layers / matmuls, batch and layer norms, and the attention products
(``aten::scaled_dot_product_attention``, counted here as q·kᵀ plus attention·v).
Element-wise operators (additions, activations, softmax, position encoding) are not
counted; the report lists them. Parameters are counted in total and trainable
(``requires_grad``, e.g. not the frozen stem/res2 of the ResNet). --json OUT also writes
the numbers as JSON, atomically.
"""
import logging
import sys

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from tabulate import tabulate

from detr_d2.acceleration import set_fast_paths
from detr_d2.analysis.model_complexity import FLOP_CONVENTION, analysis_report, default_input_size, flop_analysis
from detr_d2.engine import build_config
from detr_d2.engine.build import build_model
from detr_d2.utils.outputs import write_json
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_arguments
from detr_d2.utils.tool_setup import input_size, run_tool, setup_tool_logging

logger = logging.getLogger("detectron2")


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser, help="config of the model", example="MODEL.DETR.NUM_OBJECT_QUERIES 300")
    parser.add_argument("--input-size", type=input_size, metavar="HxW",
                        help="height x width of the network input, e.g. 800x1066 (default: a 640x480 "
                             "image after the config's test-time resize)")
    parser.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    return parser


def report_table(report):
    """The per-module table and the totals, as text."""
    rows = [(row["name"], f"{row['parameters']:,}", f"{row['trainable_parameters']:,}",
             f"{row['flops'] / 1e9:.4f}") for row in report["modules"]]
    rows.append(("total", f"{report['parameters']:,}", f"{report['trainable_parameters']:,}",
                 f"{report['flops'] / 1e9:.4f}"))
    table = tabulate(rows, headers=("module", "parameters", "trainable", "GFLOPs"),
                     tablefmt="github", colalign=("left", "right", "right", "right"), disable_numparse=True)
    height, width = report["input_size"]
    uncounted = ", ".join(f"{op} x{count}" for op, count in report["uncounted_operators"].items())
    return (f"{report['config_file']} at input {height}x{width} ({FLOP_CONVENTION}):\n{table}\n"
            f"Not counted (element-wise and other operators without a flop handle): {uncounted or 'none'}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    cfg = build_config(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"], all_datasets_registered=False)
    size = args.input_size or default_input_size(cfg)
    model = set_fast_paths(build_model(cfg).eval(), False)  # count the reference computation (conv and norm apart)
    report = analysis_report(model, flop_analysis(model, *size), args.config_file, size)
    print(report_table(report))
    if args.json:
        write_json(args.json, report)
        logger.info(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
