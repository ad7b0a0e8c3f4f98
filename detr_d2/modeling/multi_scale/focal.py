"""Sigmoid focal classification (Lin et al. 2017) as Deformable DETR and DINO use it: K
sigmoid outputs per query, no no-object column, in the matcher's class cost and in the
classification loss. Boxes are matched and supervised as in DETR."""
import torch
from detectron2.config import configurable

from detr_d2.modeling.criterion import LayerPredictions, SetCriterion, sigmoid_focal_loss
from detr_d2.modeling.matcher import HungarianMatcher

__all__ = ["FocalHungarianMatcher", "FocalSetCriterion", "ENCODER_SUFFIX"]

# Suffix of the two-stage encoder proposals' losses (loss_ce_enc, ...).
ENCODER_SUFFIX = "_enc"
# The matcher's focal cost adds this inside each logarithm, as the reference does.
LOG_EPSILON = 1e-8


class FocalHungarianMatcher(HungarianMatcher):
    """``HungarianMatcher`` whose class cost is the focal form: for p = sigmoid(logit) of the
    target class, alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))."""

    @configurable
    def __init__(self, *, focal_alpha=0.25, focal_gamma=2.0, **costs):
        super().__init__(**costs)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg):
        multi_scale = cfg.MODEL.MULTI_SCALE
        return {**HungarianMatcher.from_config(cfg), "focal_alpha": multi_scale.FOCAL_ALPHA,
                "focal_gamma": multi_scale.FOCAL_GAMMA}

    def class_cost(self, logits, target_labels):
        """logits [L, N, K] sigmoid logits, target_labels [T] -> [L, N, T]."""
        probability = logits.sigmoid()[..., target_labels]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * probability ** gamma * -(1 - probability + LOG_EPSILON).log()
        positive = alpha * (1 - probability) ** gamma * -(probability + LOG_EPSILON).log()
        return positive - negative


def class_agnostic(targets):
    """``targets`` with every label 0 (the two-stage proposals' foreground class)."""
    return [dict(target, labels=torch.zeros_like(target["labels"])) for target in targets]


class FocalSetCriterion(SetCriterion):
    """``SetCriterion`` with the sigmoid focal classification loss, and with the two-stage
    encoder proposals' losses (suffix ``_enc``, class-agnostic targets).

    forward(logits [L, B, Q, K], boxes [L, B, Q, 4] cxcywh normalised, targets,
    encoder_outputs: (logits [B, S, K], boxes [B, S, 4]) or None) -> UNWEIGHTED values:
    loss_ce (focal, summed over queries and classes / number of boxes), loss_bbox,
    loss_giou, class_error, cardinality_error for the last layer, ``_i`` for earlier layer
    i, ``_enc`` for the encoder proposals. ``cardinality_error`` counts queries whose
    arg-max is not the last class, as the reference does (logged only).
    """

    @configurable
    def __init__(self, *, focal_alpha=0.25, focal_gamma=2.0, two_stage=False, **arguments):
        super().__init__(**arguments)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        if two_stage:
            last_layer = ("loss_ce", "loss_bbox", "loss_giou")
            self.weight_dict.update({key + ENCODER_SUFFIX: self.weight_dict[key] for key in last_layer})

    @classmethod
    def from_config(cls, cfg):
        multi_scale = cfg.MODEL.MULTI_SCALE
        return {**SetCriterion.from_config(cfg), "matcher": FocalHungarianMatcher(cfg),
                "focal_alpha": multi_scale.FOCAL_ALPHA, "focal_gamma": multi_scale.FOCAL_GAMMA,
                "two_stage": multi_scale.TWO_STAGE}

    def loss_labels(self, predictions, targets, indices, num_boxes, is_last):
        """Focal loss over every query and class (one-hot targets of the matched queries);
        for the last layer also ``class_error``."""
        logits = predictions.logits
        batch_index = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_index = torch.cat([src for src, _ in indices])
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        one_hot = torch.zeros_like(logits)
        one_hot[batch_index, query_index, matched_labels] = 1
        loss = sigmoid_focal_loss(logits, one_hot, num_boxes, self.focal_alpha, self.focal_gamma) * logits.shape[1]
        losses = {"loss_ce": loss}
        if is_last:
            losses["class_error"] = self.class_error(logits[batch_index, query_index], matched_labels)
        return losses

    def encoder_losses(self, encoder_outputs, targets, num_boxes):
        """The two-stage proposals' losses (``_enc``) against class-agnostic targets."""
        enc_logits, enc_boxes = encoder_outputs
        targets = class_agnostic(targets)
        indices = self.matcher(enc_logits[None], enc_boxes[None], targets)[0]
        losses = self.layer_losses(LayerPredictions(enc_logits, enc_boxes), targets, indices, num_boxes, is_last=False)
        return {key + ENCODER_SUFFIX: value for key, value in losses.items()}

    def set_losses(self, logits, boxes, targets, encoder_outputs, num_boxes):
        """Every decoder layer's losses, then the encoder proposals' (when given)."""
        losses = super().set_losses(logits, boxes, targets, None, num_boxes)
        if encoder_outputs is not None:
            losses.update(self.encoder_losses(encoder_outputs, targets, num_boxes))
        return losses
