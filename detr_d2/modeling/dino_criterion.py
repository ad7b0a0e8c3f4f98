"""DINO's criterion: the focal set criterion of the matching queries (every decoder layer),
plus the query-selection proposals' losses (``_interm``, real labels) and, in training, the
denoising queries' losses (``_dn`` for the last layer, ``_dn_i`` for earlier layer i)
against their known targets, without matching."""
from typing import NamedTuple, Optional

import torch
from detectron2.config import configurable

from detr_d2.modeling.criterion import LayerPredictions
from detr_d2.modeling.multi_scale.focal import FocalHungarianMatcher, FocalSetCriterion
from detr_d2.modeling.multi_scale.denoising import positive_query_indices

__all__ = ["DinoCriterion", "DinoExtras"]

INTERM_SUFFIX = "_interm"
DENOISING_SUFFIX = "_dn"
TRAINED_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")
# DINO's generalized IoU (matching cost and loss) adds this to the union and the enclosing area.
GIOU_EPSILON = 1e-6


class DinoExtras(NamedTuple):
    """What DINO predicts besides the matching queries' logits and boxes.

    interm_logits [B, Q, K], interm_boxes [B, Q, 4]: the selected encoder proposals;
    dn_logits [L, B, P, K], dn_boxes [L, B, P, 4]: the denoising queries' predictions per
    decoder layer (None outside training); dn_groups: their group count.
    """

    interm_logits: torch.Tensor
    interm_boxes: torch.Tensor
    dn_logits: Optional[torch.Tensor] = None
    dn_boxes: Optional[torch.Tensor] = None
    dn_groups: Optional[int] = None


class DinoCriterion(FocalSetCriterion):
    """forward(logits [L, B, Q, K], boxes [L, B, Q, 4], targets, extras: DinoExtras) ->
    UNWEIGHTED values: the ``FocalSetCriterion`` ones per decoder layer, with the logged
    L1 parts ``loss_xy`` / ``loss_hw``; the same with ``_interm`` for the proposals; with
    denoising, ``_dn`` / ``_dn_i``, normalised by the box count x groups."""

    @configurable
    def __init__(self, *, denoising=True, **arguments):
        super().__init__(**arguments)
        layer_keys = [key for key in self.weight_dict if key.rsplit("_", 1)[0] in TRAINED_LOSSES
                      and key.rsplit("_", 1)[-1].isdigit()]
        self.weight_dict.update({key + INTERM_SUFFIX: self.weight_dict[key] for key in TRAINED_LOSSES})
        if denoising:
            self.weight_dict.update({key + DENOISING_SUFFIX: self.weight_dict[key] for key in TRAINED_LOSSES})
            for key in layer_keys:
                name, layer = key.rsplit("_", 1)
                self.weight_dict[f"{name}{DENOISING_SUFFIX}_{layer}"] = self.weight_dict[key]

    @classmethod
    def from_config(cls, cfg):
        matcher = FocalHungarianMatcher(**FocalHungarianMatcher.from_config(cfg), giou_epsilon=GIOU_EPSILON)
        return {**FocalSetCriterion.from_config(cfg), "matcher": matcher, "giou_epsilon": GIOU_EPSILON,
                "two_stage": False, "denoising": cfg.MODEL.DINO.DN_NUMBER > 0}

    def loss_boxes(self, predictions, targets, indices, num_boxes, is_last):
        """``SetCriterion.loss_boxes``, with the L1 loss's centre and size parts logged."""
        losses = super().loss_boxes(predictions, targets, indices, num_boxes, is_last)
        with torch.no_grad():
            positions = (torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]),
                         torch.cat([src for src, _ in indices]))
            matched = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
            l1 = (predictions.boxes[positions] - matched).abs()
            losses["loss_xy"] = l1[:, :2].sum() / num_boxes
            losses["loss_hw"] = l1[:, 2:].sum() / num_boxes
        return losses

    def interm_losses(self, extras, targets, num_boxes):
        """The selected proposals' losses (``_interm``), matched to the targets."""
        indices = self.matcher(extras.interm_logits[None], extras.interm_boxes[None], targets)[0]
        predictions = LayerPredictions(extras.interm_logits, extras.interm_boxes)
        losses = self.layer_losses(predictions, targets, indices, num_boxes, is_last=False)
        return {key + INTERM_SUFFIX: value for key, value in losses.items()}

    def denoising_losses(self, extras, targets, num_boxes):
        """Every layer's denoising losses: positive queries against their own targets."""
        pad_size = extras.dn_logits.shape[2]
        indices = positive_query_indices(targets, extras.dn_groups, pad_size)
        losses = {}
        last = len(extras.dn_logits) - 1
        for layer, (logits, boxes) in enumerate(zip(extras.dn_logits, extras.dn_boxes)):
            suffix = DENOISING_SUFFIX + ("" if layer == last else f"_{layer}")
            values = self.layer_losses(LayerPredictions(logits, boxes), targets, indices,
                                       num_boxes * extras.dn_groups, is_last=False)
            losses.update({key + suffix: value for key, value in values.items()})
        return losses

    def set_losses(self, logits, boxes, targets, extras, num_boxes):
        losses = super().set_losses(logits, boxes, targets, None, num_boxes)
        if extras is not None:
            losses.update(self.interm_losses(extras, targets, num_boxes))
            if extras.dn_logits is not None:
                losses.update(self.denoising_losses(extras, targets, num_boxes))
        return losses
