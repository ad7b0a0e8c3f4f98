"""DETR's set criterion: classification, L1 and GIoU losses over Hungarian-matched pairs.

Each loss family (``labels``, ``boxes``, ``cardinality``) is one method with one
signature, listed in ``SetCriterion.loss_families``; a new family (e.g. masks) is one
more method there and its weights in ``weight_dict``.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from detr_d2.modeling.matcher import HungarianMatcher


def num_boxes_normalizer(targets, device):
    """Number of target boxes in the batch, averaged over processes, at least 1: a float,
    or with several processes a 0-dim tensor on ``device`` (no wait for the reduction)."""
    count = float(sum(len(t["labels"]) for t in targets))
    if comm.get_world_size() == 1:
        return max(count, 1.0)
    count = torch.as_tensor(count, device=device)
    torch.distributed.all_reduce(count)
    return torch.clamp(count / comm.get_world_size(), min=1)


def _matched_positions(indices):
    """(image index, query index) of every matched prediction of one layer."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    queries = torch.cat([src for src, _ in indices])
    return batch, queries


def _matched_targets(targets, indices, key):
    return torch.cat([t[key][tgt] for t, (_, tgt) in zip(targets, indices)])


class SetCriterion(nn.Module):
    """Losses of DETR for the final decoder layer and (with deep supervision) every earlier one.

    forward(logits [L, B, Q, K+1], boxes [L, B, Q, 4] cxcywh normalised, targets) -> dict of
    UNWEIGHTED values: loss_ce, loss_bbox, loss_giou, class_error, cardinality_error for the
    last layer and the same with suffix ``_i`` (no class_error) for earlier layer i.
    ``weight_dict`` holds the weight of every trained key; the logged-only keys
    (class_error, cardinality_error) are not in it.
    """

    @configurable
    def __init__(self, *, num_classes, matcher, no_object_weight=0.1, class_weight=1.0,
                 l1_weight=5.0, giou_weight=2.0, num_decoder_layers=6, deep_supervision=True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.deep_supervision = deep_supervision
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("empty_weight", class_weights, persistent=False)
        self.loss_families = {"labels": self.loss_labels, "boxes": self.loss_boxes,
                              "cardinality": self.loss_cardinality}
        last_layer_weights = {"loss_ce": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight}
        self.weight_dict = dict(last_layer_weights)
        if deep_supervision:
            for i in range(num_decoder_layers - 1):
                self.weight_dict.update({f"{k}_{i}": v for k, v in last_layer_weights.items()})

    @classmethod
    def from_config(cls, cfg):
        detr = cfg.MODEL.DETR
        return {
            "num_classes": detr.NUM_CLASSES,
            "matcher": HungarianMatcher(cfg),
            "no_object_weight": detr.NO_OBJECT_WEIGHT,
            "class_weight": detr.CLASS_WEIGHT,
            "l1_weight": detr.L1_WEIGHT,
            "giou_weight": detr.GIOU_WEIGHT,
            "num_decoder_layers": detr.DEC_LAYERS,
            "deep_supervision": detr.DEEP_SUPERVISION,
        }

    def loss_labels(self, logits, boxes, targets, indices, num_boxes, is_last):
        """Weighted cross-entropy over all queries (unmatched ones -> no-object); for the last
        layer also ``class_error``."""
        positions = _matched_positions(indices)
        matched_labels = _matched_targets(targets, indices, "labels")
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[positions] = matched_labels
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if is_last:
            losses["class_error"] = self.class_error(logits[positions], matched_labels)
        return losses

    @staticmethod
    @torch.no_grad()
    def class_error(matched_logits, matched_labels):
        """100 - top-1 accuracy (%) of the matched queries (100 when nothing is matched)."""
        if matched_labels.numel() == 0:
            return torch.tensor(100.0, device=matched_logits.device)
        correct = (matched_logits.argmax(-1) == matched_labels).float().mean()
        return 100.0 - 100.0 * correct

    @staticmethod
    @torch.no_grad()
    def loss_cardinality(logits, boxes, targets, indices, num_boxes, is_last):
        """``cardinality_error``: mean over images of |#queries not predicting no-object - #targets|
        (logged, not trained)."""
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        expected = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, expected)}

    @staticmethod
    def loss_boxes(logits, boxes, targets, indices, num_boxes, is_last):
        """L1 and 1-GIoU summed over matched pairs, divided by ``num_boxes``."""
        matched_pred = boxes[_matched_positions(indices)]
        matched_target = _matched_targets(targets, indices, "boxes")
        loss_bbox = F.l1_loss(matched_pred, matched_target, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_convert(matched_pred, "cxcywh", "xyxy"),
                                              box_convert(matched_target, "cxcywh", "xyxy")))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def layer_losses(self, logits, boxes, targets, indices, num_boxes, is_last):
        """Every loss family for one decoder layer: logits [B, Q, K+1], boxes [B, Q, 4]."""
        losses = {}
        for family in self.loss_families.values():
            losses.update(family(logits, boxes, targets, indices, num_boxes, is_last))
        return losses

    def forward(self, logits, boxes, targets):
        if not self.deep_supervision:
            logits, boxes = logits[-1:], boxes[-1:]
        num_boxes = num_boxes_normalizer(targets, logits.device)
        indices = self.matcher(logits, boxes, targets)
        losses = {}
        last = len(logits) - 1
        for layer in range(len(logits)):
            suffix = "" if layer == last else f"_{layer}"
            per_layer = self.layer_losses(logits[layer], boxes[layer], targets, indices[layer],
                                          num_boxes, layer == last)
            losses.update({key + suffix: value for key, value in per_layer.items()})
        return losses
