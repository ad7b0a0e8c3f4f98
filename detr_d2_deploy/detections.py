"""The graph's outputs for one image -> detections in the original image's pixels, as
``detr_d2.modeling.postprocess`` computes them (every query, no threshold)."""
from dataclasses import dataclass

import numpy as np

__all__ = ["Detections", "detections_from_outputs", "scores_and_labels"]


@dataclass
class Detections:
    """One image's detections: ``boxes`` float32 [N, 4] (x0, y0, x1, y1) in pixels of the
    original image, ``scores`` float32 [N], ``labels`` int64 [N] (contiguous class index)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.scores)

    def confident(self, threshold):
        """The detections scoring at least ``threshold``, in query order."""
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


def scores_and_labels(logits):
    """logits [..., K+1] -> (scores float32 [...], labels int64 [...]): the largest softmax
    probability among the K object classes and its class (the no-object column dropped)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = (shifted / shifted.sum(axis=-1, keepdims=True))[..., :-1]
    return probabilities.max(axis=-1).astype(np.float32), probabilities.argmax(axis=-1).astype(np.int64)


def absolute_xyxy(boxes, height, width):
    """[N, 4] (cx, cy, w, h) normalised -> [N, 4] (x0, y0, x1, y1) in pixels of a
    ``height`` x ``width`` image, clipped to it."""
    centre, size = boxes[:, :2], boxes[:, 2:]
    xyxy = np.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=1)
    xyxy = xyxy * np.array([width, height, width, height], dtype=boxes.dtype)
    return np.clip(xyxy, 0, np.array([width, height, width, height], dtype=boxes.dtype))


def detections_from_outputs(logits, boxes, original_size):
    """One image's graph outputs (logits [Q, K+1], boxes [Q, 4] normalised cxcywh) ->
    ``Detections`` of all Q queries in pixels of ``original_size`` (height, width)."""
    scores, labels = scores_and_labels(logits)
    return Detections(absolute_xyxy(boxes, *original_size), scores, labels)
