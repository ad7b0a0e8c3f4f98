"""Inference output of the sigmoid-classified DETRs: the top-k (query, class) pairs.

Each of the Q queries has K independent class probabilities; the k best of all Q x K
pairs become detections (a query may appear with several classes), as the reference
``PostProcess`` of Deformable DETR (k = 100) and DINO (k = 300) do.
"""
import torch
from detectron2.structures import Boxes, Instances

from detr_d2.modeling.box_ops import normalized_cxcywh_to_absolute_xyxy
from detr_d2.modeling.float32 import float32_island
from detr_d2.modeling.postprocess import requested_size

__all__ = ["topk_detections", "topk_results_for_batch"]


def topk_detections(logits, boxes, k):
    """logits [Q, K] sigmoid logits, boxes [Q, 4] -> (scores [k'], labels [k'], boxes [k', 4])
    of the k' = min(k, Q*K) best pairs, best first; boxes as given (per query)."""
    probabilities = logits.sigmoid().flatten()
    scores, index = torch.topk(probabilities, min(k, probabilities.numel()))
    num_classes = logits.shape[-1]
    return scores, index % num_classes, boxes[torch.div(index, num_classes, rounding_mode="floor")]


@float32_island
def topk_results_for_batch(logits, boxes, batched_inputs, image_sizes, k):
    """logits [B, Q, K], boxes [B, Q, 4] normalised cxcywh -> [{"instances": Instances}] per
    input with ``pred_boxes`` (xyxy pixels of the requested size, clipped), ``scores``,
    ``pred_classes`` of the top-k pairs."""
    results = []
    with torch.no_grad():
        for image_logits, image_boxes, item, size in zip(logits, boxes, batched_inputs, image_sizes):
            height, width = requested_size(item, size)
            scores, labels, kept_boxes = topk_detections(image_logits, image_boxes.float(), k)
            pred_boxes = Boxes(normalized_cxcywh_to_absolute_xyxy(kept_boxes, height, width))
            pred_boxes.clip((height, width))
            instances = Instances((height, width), pred_boxes=pred_boxes, scores=scores, pred_classes=labels)
            results.append({"instances": instances})
    return results
