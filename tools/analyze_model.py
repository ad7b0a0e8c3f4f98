#!/usr/bin/env python
"""Count the parameters and FLOPs of a config's model, per top-level module.

    python tools/analyze_model.py --config-file CFG --input-size HxW [--json OUT] \\
        [--opts KEY VALUE ...]

The model is built from the config on the CPU (no weights are loaded: counts do not
depend on them) and traced by fvcore's FlopCountAnalysis in inference mode on one
H x W image, the size the network sees (no test-time resize). fvcore counts one fused
multiply-add as one flop (so "GFLOPs" here are GMACs, as in detectron2's model zoo):
convolutions, linear layers / matmuls, batch and layer norms, and the attention products
(``aten::scaled_dot_product_attention``, counted here as q·kᵀ plus attention·v).
Element-wise operators (additions, activations, softmax, position encoding) are not
counted; the report lists them. Parameters are counted in total and trainable
(``requires_grad``, e.g. not the frozen stem/res2 of the ResNet). --json OUT also writes
the numbers as JSON, atomically.
"""
import argparse
import logging
import sys
import warnings

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from tabulate import tabulate
from torch import nn

from detr_d2.acceleration import set_fast_paths
from detr_d2.engine import build_config
from detr_d2.engine.build import build_model
from detr_d2.utils.outputs import write_json
from detr_d2.utils.tool_setup import input_size, run_tool, setup_tool_logging

FLOP_CONVENTION = "fvcore: one multiply-add counts as one flop"
OTHER = "(outside submodules)"

logger = logging.getLogger("detectron2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input-size", required=True, type=input_size, metavar="HxW",
                        help="height x width of the network input, e.g. 800x1066")
    parser.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides")
    return parser


def attention_flop_jit(inputs, outputs):
    """Multiply-adds of ``aten::scaled_dot_product_attention(q, k, v, ...)``:
    q [..., L, E] · kᵀ [..., E, S] plus attention [..., L, S] · v [..., S, Ev]."""
    query, key, value = (get_shape(tensor) for tensor in inputs[:3])
    batch = 1
    for size in query[:-2]:
        batch *= size
    return batch * query[-2] * key[-2] * (query[-1] + value[-1])


class ImageToDetections(nn.Module):
    """``model`` as a function of one CHW uint8 image, for tracing: returns the tensors
    of its Instances (boxes xyxy, scores, classes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        instances = self.model([{"image": image}])[0]["instances"]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def flop_analysis(model, height, width):
    """fvcore's FlopCountAnalysis of ``model`` (eval mode) on one zero image of HxW."""
    image = torch.zeros((3, height, width), dtype=torch.uint8)
    analysis = FlopCountAnalysis(ImageToDetections(model), (image,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", attention_flop_jit)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        analysis.total()  # runs the trace once; later queries use the cached result
    return analysis


def parameter_counts(module):
    """(all parameters, trainable parameters) of ``module``."""
    parameters = list(module.parameters())
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def module_rows(model, analysis):
    """Per top-level module (those with parameters or flops): {"name", "parameters",
    "trainable_parameters", "flops"}; then the flops outside any of them."""
    flops_by_module = analysis.by_module()
    rows = []
    for name, child in model.named_children():
        total, trainable = parameter_counts(child)
        flops = flops_by_module.get(f"model.{name}", 0)
        if total or flops:
            rows.append({"name": name, "parameters": total, "trainable_parameters": trainable, "flops": flops})
    outside = analysis.total() - sum(row["flops"] for row in rows)
    if outside:
        rows.append({"name": OTHER, "parameters": 0, "trainable_parameters": 0, "flops": outside})
    return rows


def analysis_report(model, analysis, config_file, size):
    """Everything the tool reports, as a JSON-able dict."""
    total, trainable = parameter_counts(model)
    return {
        "config_file": config_file,
        "input_size": list(size),
        "parameters": total,
        "trainable_parameters": trainable,
        "flops": analysis.total(),
        "flop_convention": FLOP_CONVENTION,
        "modules": module_rows(model, analysis),
        "uncounted_operators": dict(sorted(analysis.unsupported_ops().items())),
    }


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
    model = set_fast_paths(build_model(cfg).eval(), False)  # count the reference computation (conv and norm apart)
    report = analysis_report(model, flop_analysis(model, *args.input_size), args.config_file, args.input_size)
    print(report_table(report))
    if args.json:
        write_json(args.json, report)
        logger.info(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
