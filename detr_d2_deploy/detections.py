"""The graph's outputs for one image -> detections in the original image's pixels, as
``detr_d2.modeling.postprocess`` (softmax: every query) and
``detr_d2.modeling.multi_scale.topk_postprocess`` (sigmoid: the top-k (query, class) pairs)
compute them, no threshold."""
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["Detections", "binary_masks", "detections_from_outputs", "scores_and_labels", "sigmoid",
           "topk_pairs"]


@dataclass
class Detections:
    """One image's detections: ``boxes`` float32 [N, 4] (x0, y0, x1, y1) in pixels of the
    original image, ``scores`` float32 [N], ``labels`` int64 [N] (contiguous class index),
    ``masks`` bool [N, height, width] of the original image (MODEL.MASK_ON exports) or None."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.scores)

    def confident(self, threshold):
        """The detections scoring at least ``threshold``, in query order."""
        keep = self.scores >= threshold
        masks = None if self.masks is None else self.masks[keep]
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], masks)


def scores_and_labels(logits):
    """logits [..., K+1] -> (scores float32 [...], labels int64 [...]): the largest softmax
    probability among the K object classes and its class (the no-object column dropped)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = (shifted / shifted.sum(axis=-1, keepdims=True))[..., :-1]
    return probabilities.max(axis=-1).astype(np.float32), probabilities.argmax(axis=-1).astype(np.int64)


def sigmoid(logits):
    """1 / (1 + exp(-logits)), float32, without overflow for large negative logits."""
    logits = logits.astype(np.float32)
    exp_of_negative_magnitude = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1 / (1 + exp_of_negative_magnitude),
                    exp_of_negative_magnitude / (1 + exp_of_negative_magnitude)).astype(np.float32)


def topk_pairs(logits, k):
    """logits [Q, K] sigmoid logits -> (scores float32 [k'], labels int64 [k'], queries int64
    [k']): the k' = min(k, Q*K) (query, class) pairs of highest probability, best first
    (equal probabilities in (query, class) order)."""
    probabilities = sigmoid(logits).reshape(-1)
    best = np.argsort(-probabilities, kind="stable")[:min(k, probabilities.size)]
    num_classes = logits.shape[-1]
    return probabilities[best], (best % num_classes).astype(np.int64), (best // num_classes).astype(np.int64)


def absolute_xyxy(boxes, height, width):
    """[N, 4] (cx, cy, w, h) normalised -> [N, 4] (x0, y0, x1, y1) in pixels of a
    ``height`` x ``width`` image, clipped to it."""
    centre, size = boxes[:, :2], boxes[:, 2:]
    xyxy = np.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=1)
    xyxy = xyxy * np.array([width, height, width, height], dtype=boxes.dtype)
    return np.clip(xyxy, 0, np.array([width, height, width, height], dtype=boxes.dtype))


def nearest_sources(length_out, length_in):
    """Source index of each of ``length_out`` positions in a nearest-neighbour resize from
    ``length_in`` (torch's "nearest": floor(dst * in / out), at most in - 1)."""
    scale = np.float32(length_in) / np.float32(length_out)
    return np.minimum(np.floor(np.arange(length_out, dtype=np.float32) * scale).astype(np.int64), length_in - 1)


def bilinear_sources(positions, length_in, length_out):
    """(first index, second index, weight of the second) of each output position in
    ``positions`` of a bilinear resize from ``length_in`` to ``length_out`` (torch's
    align_corners=False: source (dst + 0.5) * in / out - 0.5, at least 0)."""
    scale = np.float32(length_in) / np.float32(length_out)
    source = np.maximum((positions.astype(np.float32) + 0.5) * scale - 0.5, 0).astype(np.float32)
    first = np.floor(source).astype(np.int64)
    return first, np.minimum(first + 1, length_in - 1), source - first


def binary_masks(mask_logits, padded_size, image_size, output_size, threshold):
    """The reference's ``PostProcessSegm`` for one image: mask logits [Q, h2, w2] upsampled
    bilinearly to ``padded_size`` (H, W), sigmoid > ``threshold``, cropped to ``image_size``
    (h, w), resized to ``output_size`` by nearest neighbour -> bool [Q, height, width].
    Only the upsampled pixels that the crop and the resize keep are computed."""
    rows = nearest_sources(output_size[0], image_size[0])
    columns = nearest_sources(output_size[1], image_size[1])
    top, bottom, down = bilinear_sources(rows, mask_logits.shape[1], padded_size[0])
    left, right, across = bilinear_sources(columns, mask_logits.shape[2], padded_size[1])
    by_row = mask_logits[:, top, :] * (1 - down)[:, None] + mask_logits[:, bottom, :] * down[:, None]
    values = by_row[:, :, left] * (1 - across) + by_row[:, :, right] * across
    return 1 / (1 + np.exp(-values)) > threshold


def detections_from_outputs(logits, boxes, original_size, topk=None):
    """One image's graph outputs (logits [Q, K+1] of a softmax export, or [Q, K] sigmoid
    logits; boxes [Q, 4] normalised cxcywh) -> ``Detections`` in pixels of ``original_size``
    (height, width), without masks (see ``binary_masks``): with ``topk`` None one per query
    (softmax, "no object" dropped), else the ``topk`` best (query, class) pairs of the
    sigmoid probabilities (``topk_pairs``), best first."""
    if topk is None:
        scores, labels = scores_and_labels(logits)
    else:
        scores, labels, queries = topk_pairs(logits, topk)
        boxes = boxes[queries]
    return Detections(absolute_xyxy(boxes, *original_size), scores, labels)
