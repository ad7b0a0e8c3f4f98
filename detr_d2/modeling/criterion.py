"""DETR's set criterion: classification, L1 and GIoU losses over Hungarian-matched pairs,
and with masks the focal and dice losses of the matched masks (last decoder layer).

Each loss family (``labels``, ``boxes``, ``cardinality``, ``masks``) is one method with one
signature, listed in ``SetCriterion.loss_families``; a new family is one more method there
and its weights in ``weight_dict``.
"""
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert

from detr_d2.modeling.box_ops import paired_generalized_box_iou
from detr_d2.modeling.float32 import float32_island
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


def _largest_mask_size(targets):
    """(H, W): the largest height and width of the targets' "masks"; None without masks."""
    if not targets or "masks" not in targets[0]:
        return None
    return tuple(max(t["masks"].shape[d] for t in targets) for d in (-2, -1))


def _batch_entry(value, index):
    """Image ``index`` of a per-batch value: a tensor [B, ...] (kept as [1, ...]), a tuple or
    NamedTuple of them (each sliced; None items stay None), or None."""
    if value is None:
        return None
    if isinstance(value, tuple):
        items = [_batch_entry(item, index) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value[index:index + 1]


def _padded(target, size):
    """``target`` with its "masks" [n, h, w] zero-padded at the bottom/right to ``size`` (H, W)."""
    if size is None:
        return target
    masks = target["masks"]
    return dict(target, masks=F.pad(masks, (0, size[1] - masks.shape[-1], 0, size[0] - masks.shape[-2])))


class LayerPredictions(NamedTuple):
    """One decoder layer's predictions: logits [B, Q, K+1], boxes [B, Q, 4] normalised
    cxcywh, mask_logits [B, Q, h, w] or a function of matched positions (image index [N],
    query index [N]) giving their logits [N, h, w] (None without a mask head and for
    earlier layers)."""

    logits: torch.Tensor
    boxes: torch.Tensor
    mask_logits: Optional[Union[torch.Tensor, Callable]] = None

    def matched_mask_logits(self, positions):
        """[N, h, w]: the mask logits of the matched (image index, query index) positions."""
        if callable(self.mask_logits):
            return self.mask_logits(positions)
        return self.mask_logits[positions]


def padded_target_masks(targets):
    """Every image's "masks" [n_i, h_i, w_i] zero-padded at the bottom/right to the largest
    h and w of the batch: [B, max n, H, W] float."""
    masks = [t["masks"] for t in targets]
    height = max(m.shape[-2] for m in masks)
    width = max(m.shape[-1] for m in masks)
    padded = masks[0].new_zeros((len(masks), max(len(m) for m in masks), height, width), dtype=torch.float32)
    for i, m in enumerate(masks):
        padded[i, :len(m), :m.shape[-2], :m.shape[-1]] = m
    return padded


def sigmoid_focal_loss(logits, targets, num_boxes, alpha=0.25, gamma=2.0):
    """Focal loss (Lin et al. 2017) of logits / 0-1 targets [N, P]: mean over the P pixels
    of each mask, summed over masks, divided by ``num_boxes``."""
    probability = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probability * targets + (1 - probability) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(1).sum() / num_boxes


def dice_loss(logits, targets, num_boxes):
    """1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) per mask of logits / targets [N, P],
    p = sigmoid(logits); summed over masks, divided by ``num_boxes``."""
    probability = logits.sigmoid()
    numerator = 2 * (probability * targets).sum(1)
    denominator = probability.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


class SetCriterion(nn.Module):
    """Losses of DETR for the final decoder layer and (with deep supervision) every earlier one.

    forward(logits [L, B, Q, K+1], boxes [L, B, Q, 4] cxcywh normalised, targets,
    mask_logits of the last layer ([B, Q, h, w], or a function: see ``LayerPredictions``) or
    None) -> dict of UNWEIGHTED values:
    loss_ce, loss_bbox, loss_giou, class_error, cardinality_error (and with masks
    loss_mask, loss_dice) for the last layer and loss_ce, loss_bbox, loss_giou,
    cardinality_error with suffix ``_i`` for earlier layer i.
    ``weight_dict`` holds the weight of every trained key; the logged-only keys
    (class_error, cardinality_error) are not in it.
    """

    @configurable
    def __init__(self, *, num_classes, matcher, no_object_weight=0.1, class_weight=1.0,
                 l1_weight=5.0, giou_weight=2.0, num_decoder_layers=6, deep_supervision=True,
                 mask_weights=None, giou_epsilon=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.giou_epsilon = giou_epsilon
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
        if mask_weights is not None:
            self.loss_families["masks"] = self.loss_masks
            self.weight_dict.update(mask_weights)

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
            "mask_weights": ({"loss_mask": detr.MASK_WEIGHT, "loss_dice": detr.DICE_WEIGHT}
                             if cfg.MODEL.MASK_ON else None),
        }

    def loss_labels(self, predictions, targets, indices, num_boxes, is_last):
        """Weighted cross-entropy over all queries (unmatched ones -> no-object); for the last
        layer also ``class_error``."""
        logits = predictions.logits
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
    def loss_cardinality(predictions, targets, indices, num_boxes, is_last):
        """``cardinality_error``: mean over images of |#queries not predicting no-object - #targets|
        (logged, not trained)."""
        logits = predictions.logits
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        expected = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, expected)}

    def loss_boxes(self, predictions, targets, indices, num_boxes, is_last):
        """L1 and 1-GIoU summed over matched pairs, divided by ``num_boxes``."""
        matched_pred = predictions.boxes[_matched_positions(indices)]
        matched_target = _matched_targets(targets, indices, "boxes")
        loss_bbox = F.l1_loss(matched_pred, matched_target, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_convert(matched_pred, "cxcywh", "xyxy"),
                                          box_convert(matched_target, "cxcywh", "xyxy"), self.giou_epsilon)
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    @staticmethod
    def loss_masks(predictions, targets, indices, num_boxes, is_last):
        """Last layer only: ``loss_mask`` (sigmoid focal, alpha 0.25, gamma 2) and ``loss_dice``
        of the matched queries' mask logits, upsampled bilinearly to the batch's padded target
        mask size, over every pixel (padding included), divided by ``num_boxes``."""
        if not is_last:
            return {}
        target_masks = padded_target_masks(targets)
        image_index, _ = _matched_positions(indices)
        target_index = torch.cat([tgt for _, tgt in indices])
        matched_targets = target_masks[image_index, target_index].flatten(1)
        matched_logits = predictions.matched_mask_logits(_matched_positions(indices))
        upsampled = F.interpolate(matched_logits[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0].flatten(1)
        return {"loss_mask": sigmoid_focal_loss(upsampled, matched_targets, num_boxes),
                "loss_dice": dice_loss(upsampled, matched_targets, num_boxes)}

    def layer_losses(self, predictions, targets, indices, num_boxes, is_last):
        """Every loss family for one decoder layer's ``LayerPredictions``."""
        losses = {}
        for family in self.loss_families.values():
            losses.update(family(predictions, targets, indices, num_boxes, is_last))
        return losses

    @float32_island
    def forward(self, logits, boxes, targets, mask_logits=None):
        """The batch's values, boxes normalised by the batch's box count averaged over processes."""
        return self.set_losses(logits, boxes, targets, mask_logits, num_boxes_normalizer(targets, logits.device))

    @float32_island
    def per_image(self, logits, boxes, targets, mask_logits=None):
        """The values of each image of the batch on its own: a list of ``forward``'s dicts.

        Each image is matched and normalised by its own box count (at least 1), with no
        reduction across processes (evaluation: each process sees other images). Shapes as
        ``forward``'s (``mask_logits``: a [B, ...] tensor or a tuple of them, e.g. a
        subclass's extra predictions); an image's target masks are zero-padded to the
        batch's largest size, the area its mask logits cover.
        """
        padded_size = _largest_mask_size(targets)
        values = []
        for i, target in enumerate(targets):
            values.append(self.set_losses(logits[:, i:i + 1], boxes[:, i:i + 1], [_padded(target, padded_size)],
                                          _batch_entry(mask_logits, i), max(float(len(target["labels"])), 1.0)))
        return values

    def set_losses(self, logits, boxes, targets, mask_logits, num_boxes):
        """Match every layer, then every loss family per layer, normalised by ``num_boxes``."""
        if not self.deep_supervision:
            logits, boxes = logits[-1:], boxes[-1:]
        indices = self.matcher(logits, boxes, targets)
        losses = {}
        last = len(logits) - 1
        for layer in range(len(logits)):
            is_last = layer == last
            suffix = "" if is_last else f"_{layer}"
            predictions = LayerPredictions(logits[layer], boxes[layer], mask_logits if is_last else None)
            per_layer = self.layer_losses(predictions, targets, indices[layer], num_boxes, is_last)
            losses.update({key + suffix: value for key, value in per_layer.items()})
        return losses
