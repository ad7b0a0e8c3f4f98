"""Turn DETR's raw outputs into detectron2 ``Instances`` (every query, no threshold)."""
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from detr_d2.modeling.box_ops import normalized_cxcywh_to_absolute_xyxy
from detr_d2.modeling.float32 import float32_island


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


def binary_masks(mask_logits, padded_size, image_size, output_size, threshold=0.5):
    """The reference's ``PostProcessSegm`` for one image: mask logits [Q, h, w] (res2 size of
    the padded batch) upsampled bilinearly to ``padded_size`` (the batch's largest image
    (H, W)), sigmoid > ``threshold``, cropped to ``image_size`` (h, w) and resized to
    ``output_size`` by nearest neighbour (source index floor(dst * in / out)) -> bool
    [Q, height, width]."""
    upsampled = F.interpolate(mask_logits[None].float(), size=tuple(padded_size), mode="bilinear",
                              align_corners=False)[0]
    height, width = image_size
    cropped = (upsampled.sigmoid() > threshold)[:, :height, :width]
    return F.interpolate(cropped[None].float(), size=tuple(output_size), mode="nearest")[0].to(torch.bool)


@float32_island
def results_for_batch(logits, boxes, batched_inputs, image_sizes, mask_logits=None, mask_threshold=0.5):
    """logits [B, Q, K+1], boxes [B, Q, 4] -> [{"instances": Instances}] per input; with
    mask_logits [B, Q, h, w] the instances also get ``pred_masks`` (``binary_masks``)."""
    results = []
    with torch.no_grad():
        for i, (inp, size) in enumerate(zip(batched_inputs, image_sizes)):
            output_size = requested_size(inp, size)
            instances = detections_to_instances(logits[i], boxes[i], output_size)
            if mask_logits is not None:
                padded_size = [max(s[d] for s in image_sizes) for d in (0, 1)]
                instances.pred_masks = binary_masks(mask_logits[i], padded_size, size, output_size,
                                                    mask_threshold)
            results.append({"instances": instances})
    return results
