"""Parameter and FLOP counts of a model, per top-level module (fvcore's FlopCountAnalysis).

fvcore counts one fused multiply-add as one flop (so "GFLOPs" are GMACs, as in
detectron2's model zoo): convolutions, linear layers / matmuls, batch and layer norms, and
the attention products (``aten::scaled_dot_product_attention``, counted as q·kᵀ plus
attention·v). Element-wise operators are not counted; ``analysis_report`` lists them.
"""
import warnings

import torch
from detectron2.data.transforms import ResizeShortestEdge
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ["FLOP_CONVENTION", "analysis_report", "default_input_size", "flop_analysis", "parameter_counts"]

FLOP_CONVENTION = "fvcore: one multiply-add counts as one flop"
OTHER = "(outside submodules)"
# The most common COCO image size (height, width), for a network-input size from a config.
TYPICAL_IMAGE_SIZE = (480, 640)


def default_input_size(cfg):
    """(H, W) the network sees for a typical 640x480 (landscape 4:3) image under the config's
    test-time resize (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST): 800x1067 for DETR's configs."""
    return ResizeShortestEdge.get_output_shape(*TYPICAL_IMAGE_SIZE, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)


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
