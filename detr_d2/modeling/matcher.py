"""Hungarian matching of DETR's predictions to ground-truth boxes."""
import torch
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert

from detr_d2.modeling.box_ops import generalized_box_iou
from detr_d2.modeling.float32 import float32_island


def _empty_match(device="cpu"):
    empty = torch.empty(0, dtype=torch.int64, device=device)
    return empty, empty


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class*C_class + cost_bbox*C_L1 + cost_giou*C_GIoU.

    C_class is minus the softmax probability of the target class, C_L1 the L1 distance
    between normalised cxcywh boxes, C_GIoU minus the generalized IoU (boxes as xyxy).
    The cost matrices of all given decoder layers are built on the model's device and
    reach the CPU in a single transfer.
    """

    @configurable
    def __init__(self, *, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, giou_epsilon=0.0):
        super().__init__()
        self.giou_epsilon = giou_epsilon
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("MODEL.DETR.COST_CLASS/COST_BBOX/COST_GIOU cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @classmethod
    def from_config(cls, cfg):
        detr = cfg.MODEL.DETR
        return {"cost_class": detr.COST_CLASS, "cost_bbox": detr.COST_BBOX, "cost_giou": detr.COST_GIOU}

    @staticmethod
    def class_cost(logits, target_labels):
        """logits [L, N, K+1], target_labels [T] -> [L, N, T]: minus the softmax probability
        of each target's class."""
        return -logits.softmax(-1)[..., target_labels]

    def cost_matrices(self, logits, boxes, targets):
        """logits [L, B, Q, K+1], boxes [L, B, Q, 4] cxcywh normalised; targets: per image
        {"labels": [n], "boxes": [n, 4] cxcywh normalised} -> costs [L, B*Q, sum n]."""
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        cost_class = self.class_cost(logits.flatten(1, 2), target_labels)
        pred_boxes = boxes.flatten(1, 2)
        cost_bbox = torch.cdist(pred_boxes, target_boxes[None].expand(len(pred_boxes), -1, -1), p=1)
        pred_xyxy = box_convert(pred_boxes.flatten(0, 1), "cxcywh", "xyxy")
        giou = generalized_box_iou(pred_xyxy, box_convert(target_boxes, "cxcywh", "xyxy"), self.giou_epsilon)
        cost_giou = -giou.view(cost_bbox.shape)
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    @float32_island
    def forward(self, logits, boxes, targets):
        """Match every layer: returns, per layer, per image, (query indices, target indices),
        int64 CPU tensors of equal length min(Q, n), target indices in query order."""
        num_layers, batch, num_queries = logits.shape[:3]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [[_empty_match() for _ in range(batch)] for _ in range(num_layers)]
        costs = self.cost_matrices(logits, boxes, targets).view(num_layers, batch, num_queries, -1)
        costs = costs.float().cpu()
        return [[self._assign(layer_costs[i], block) for i, block in enumerate(self._target_blocks(sizes))]
                for layer_costs in costs]

    @staticmethod
    def _target_blocks(sizes):
        start = 0
        for size in sizes:
            yield slice(start, start + size)
            start += size

    @staticmethod
    def _assign(image_costs, block):
        """image_costs [Q, sum n] -> (query idx, target idx) for the targets in ``block``."""
        if block.stop == block.start:
            return _empty_match()
        rows, cols = linear_sum_assignment(image_costs[:, block].numpy())
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
