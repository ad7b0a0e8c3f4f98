"""Box conversions at DETR's boundaries.

DETR predicts and matches boxes as (cx, cy, w, h) normalised by the unpadded image size;
detectron2 stores them as (x0, y0, x1, y1) in absolute pixels. Generic operations
(format conversion, generalized IoU) come from ``torchvision.ops``; DINO's generalized IoU
with its epsilons is ``generalized_box_iou(..., eps)``; losses take the generalized IoU of
matched pairs only (``paired_generalized_box_iou``: the diagonal of the pairwise matrix,
without the matrix).
"""
import torch
from torchvision.ops import box_area, box_convert
from torchvision.ops import generalized_box_iou as torchvision_generalized_box_iou


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


def generalized_box_iou(boxes1, boxes2, eps=0.0):
    """Pairwise generalized IoU of xyxy boxes [N, 4] and [M, 4] -> [N, M]: torchvision's,
    or with ``eps`` > 0 DINO's form, which adds ``eps`` to the union and to the enclosing
    area before dividing."""
    if eps == 0:
        return torchvision_generalized_box_iou(boxes1, boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    inner = (torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2])).clamp(min=0)
    intersection = inner[..., 0] * inner[..., 1]
    union = area1[:, None] + area2 - intersection
    outer = (torch.max(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, None, :2], boxes2[:, :2])).clamp(min=0)
    enclosing = outer[..., 0] * outer[..., 1]
    return intersection / (union + eps) - (enclosing - union) / (enclosing + eps)


def paired_generalized_box_iou(boxes1, boxes2, eps=0.0):
    """Generalized IoU of each pair of xyxy boxes [N, 4] and [N, 4] -> [N]: the diagonal of
    ``generalized_box_iou(boxes1, boxes2, eps)``, computed by the same arithmetic per pair."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    inner = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    intersection = inner[:, 0] * inner[:, 1]
    union = area1 + area2 - intersection
    outer = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclosing = outer[:, 0] * outer[:, 1]
    return intersection / (union + eps) - (enclosing - union) / (enclosing + eps)
