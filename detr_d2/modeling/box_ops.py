"""Box conversions at DETR's boundaries.

DETR predicts and matches boxes as (cx, cy, w, h) normalised by the unpadded image size;
detectron2 stores them as (x0, y0, x1, y1) in absolute pixels. Generic operations
(format conversion, generalized IoU) come from ``torchvision.ops``.
"""
import torch
from torchvision.ops import box_convert


def absolute_xyxy_to_normalized_cxcywh(boxes, height, width):
    """[N, 4] xyxy absolute pixels -> [N, 4] cxcywh divided by image width/height."""
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes, "xyxy", "cxcywh") / scale


def normalized_cxcywh_to_absolute_xyxy(boxes, height, width):
    """[..., 4] normalised cxcywh -> [..., 4] xyxy in pixels of an image of ``height`` x ``width``."""
    scale = torch.as_tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return box_convert(boxes, "cxcywh", "xyxy") * scale


def inverse_sigmoid(x, eps=1e-5):
    """logit(x) of values in [0, 1], clamped away from 0 and 1 by ``eps`` (as the
    multi-scale DETRs' box refinement computes it)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
