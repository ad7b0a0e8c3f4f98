#!/usr/bin/env python
"""Keep only the inference weights of a training checkpoint, for sharing or bundling.

    python tools/slim_checkpoint.py --input OUTPUT_DIR/model_final.pth --output model.pth \
        [--metrics OUTPUT_DIR/metrics.json] [--config OUTPUT_DIR/config.yaml]

A training checkpoint (``DetectionCheckpointer`` layout: {"model", "optimizer",
"scheduler", "iteration", ...}) is several times larger than the model. The output holds
{"model": state dict, "__author__": "detr_d2"} with the model's tensors only, less the
training-only ones (Group DETR's extra query groups): the output is a plain DETR. With
``--metrics``/``--config`` the run's metrics.json / config.yaml are copied next to the
output as ``<output stem>.metrics.json`` / ``.yaml``. All files are written atomically.
"""
import argparse
import logging
import os
import shutil
import sys

import detr_d2  # noqa: F401  (first: compat fixes)
from detr_d2.checkpoint.io import CheckpointError, atomic_torch_save, atomic_write, load_checkpoint_file
from detr_d2.modeling.query_groups import TRAINING_ONLY_TENSOR_PREFIXES
from detr_d2.utils.tool_setup import run_tool, setup_tool_logging

logger = logging.getLogger("detectron2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="FILE", help="training checkpoint (.pth)")
    parser.add_argument("--output", required=True, metavar="FILE", help="slim checkpoint to write (.pth)")
    parser.add_argument("--metrics", metavar="FILE", help="metrics.json of the run, copied beside the output")
    parser.add_argument("--config", metavar="FILE", help="config.yaml of the run, copied beside the output")
    return parser


def inference_state_dict(checkpoint, path):
    """The model tensors of ``checkpoint`` (loaded from ``path``) used at inference."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no 'model' state dict; give a checkpoint written by "
                              "tools/train_net.py (OUTPUT_DIR/model_*.pth)")
    return {name: tensor for name, tensor in state.items()
            if not name.startswith(TRAINING_ONLY_TENSOR_PREFIXES)}


def copy_beside(source, output, suffix):
    """Copy ``source`` to ``<output without .pth><suffix>`` atomically; return that path."""
    target = os.path.splitext(output)[0] + suffix
    with open(source, "rb") as source_file:
        atomic_write(target, lambda file: shutil.copyfileobj(source_file, file))
    return target


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    state = inference_state_dict(load_checkpoint_file(args.input), args.input)
    atomic_torch_save({"model": state, "__author__": "detr_d2"}, args.output)
    size_mb = os.path.getsize(args.output) / 2 ** 20
    logger.info(f"Wrote {args.output}: {len(state)} tensors, "
                f"{sum(v.numel() for v in state.values()):,} values, {size_mb:.1f} MiB")
    for source, suffix in ((args.metrics, ".metrics.json"), (args.config, ".yaml")):
        if source:
            logger.info(f"Copied {source} to {copy_beside(source, args.output, suffix)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
