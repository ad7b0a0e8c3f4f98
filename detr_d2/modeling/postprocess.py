"""Turn DETR's raw outputs into detectron2 ``Instances`` (every query, no threshold)."""
import torch
from detectron2.structures import Boxes, Instances

from detr_d2.modeling.box_ops import normalized_cxcywh_to_absolute_xyxy


def scores_and_labels(logits):
    """logits [..., K+1] -> (scores, labels) [...]: max and argmax of the softmax over the
    K object classes (the last, no-object, column is dropped after the softmax)."""
    return logits.softmax(-1)[..., :-1].max(-1)


def detections_to_instances(logits, boxes, output_size):
    """One image: logits [Q, K+1], boxes [Q, 4] normalised cxcywh, output_size (h, w) ->
    Instances with ``pred_boxes`` (xyxy pixels of that size, clipped to it), ``scores``,
    ``pred_classes`` for all Q queries."""
    scores, labels = scores_and_labels(logits)
    height, width = output_size
    pred_boxes = Boxes(normalized_cxcywh_to_absolute_xyxy(boxes.float(), height, width))
    pred_boxes.clip(output_size)
    instances = Instances(output_size)
    instances.pred_boxes = pred_boxes
    instances.scores = scores
    instances.pred_classes = labels
    return instances


def requested_size(batched_input, image_size):
    """The (height, width) an input asks its results in, else its network input size."""
    return (batched_input.get("height", image_size[0]), batched_input.get("width", image_size[1]))


def results_for_batch(logits, boxes, batched_inputs, image_sizes):
    """logits [B, Q, K+1], boxes [B, Q, 4] -> [{"instances": Instances}] per input."""
    with torch.no_grad():
        return [{"instances": detections_to_instances(lg, bx, requested_size(inp, size))}
                for lg, bx, inp, size in zip(logits, boxes, batched_inputs, image_sizes)]
