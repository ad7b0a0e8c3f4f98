"""Exported model vs eager PyTorch on the same images: the largest differences.

The eager side is the model as tools/demo.py runs it (``Detr.forward``, fast paths as
configured); the exported side is the graph with detr_d2_deploy's normalisation, padding
and post-processing, i.e. what tools/predict_onnx.py computes. Images are given at their
network-input size (no resize), so both see the same pixels.

Compared per image and query (softmax models) or per (query, class) pair (sigmoid top-k
models): boxes (xyxy pixels) as a fraction of the image's width or height, scores, labels;
with MODEL.MASK_ON the binary masks, pixel by pixel, except where the eager mask
probability lies within ``MASK_PROBABILITY_MARGIN`` of the threshold.

Top-k detections come sorted by score, and pairs whose scores differ by less than the
float noise of the export may trade ranks (or places at the k-th rank): each eager
detection is paired with the exported one of its class whose box is nearest, and counts as
a label mismatch when there is none within the tolerances, unless its score is within
``SCORE_TOLERANCE`` of the k-th (it may then fall out of the exported top-k).
"""
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from detr_d2_deploy.images import normalised, padded_batch
from detr_d2_deploy.predictor import batch_detections

__all__ = ["BOX_TOLERANCE", "SCORE_TOLERANCE", "Difference", "compare", "example_batch", "paired_topk_differences",
           "verification_images", "verification_sizes", "report_lines"]

BOX_TOLERANCE = 1e-4  # of the image's width (x) or height (y)
SCORE_TOLERANCE = 1e-4
MASK_PROBABILITY_MARGIN = 1e-3  # mask pixels this close to the threshold may differ
MIN_SIDE = 64  # the smallest side of a verified (and traced) image (see exporters.min_traced_side)


@dataclass
class Difference:
    """The largest differences over one batch: ``box`` (fraction of the image side),
    ``score``, ``label_mismatches`` (queries whose label differs), ``mask_mismatches``
    (mask pixels that differ away from the threshold; None without masks), ``sizes``
    (h, w) per image."""

    name: str
    sizes: list
    box: float
    score: float
    label_mismatches: int
    mask_mismatches: Optional[int] = None

    @property
    def within_tolerance(self):
        return (self.box <= BOX_TOLERANCE and self.score <= SCORE_TOLERANCE and self.label_mismatches == 0
                and not self.mask_mismatches)

    def to_json(self):
        return {**asdict(self), "within_tolerance": self.within_tolerance}


def _off_grid(length):
    """``length``, or one more when it is a multiple of 32 (the backbone's stride)."""
    return length + 1 if length % 32 == 0 else length


def verification_sizes(shortest_edge, min_side=MIN_SIDE):
    """Three (height, width) network-input sizes near ``shortest_edge`` (800 if 0), none a
    multiple of 32, no side below ``min_side`` or MIN_SIDE: landscape, portrait, and a
    smaller landscape one."""
    side = max(shortest_edge or 800, MIN_SIDE, min_side * 4 // 3 + 1)
    sizes = [(side - 5, side * 4 // 3 + 3), (side * 4 // 3 + 9, side - 11), (side * 3 // 4 + 1, side - 3)]
    return [(_off_grid(height), _off_grid(width)) for height, width in sizes]


def verification_images(sizes, sample_image=None, seed=0):
    """HWC uint8 images of ``sizes``: ``sample_image`` resized to each (Pillow bilinear), or
    smooth random images (seeded)."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        source = sample_image if sample_image is not None else rng.integers(
            0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
        images.append(np.asarray(Image.fromarray(source).resize((width, height), Image.BILINEAR)))
    return images


def _graph_inputs(images, spec):
    """(images float32 [B, 3, H, W], image_sizes int64 [B, 2]) as the predictor prepares them."""
    return padded_batch([normalised(image, spec.pixel_mean, spec.pixel_std) for image in images])


def example_batch(images, spec):
    """The graph inputs of ``images`` as torch tensors, for tracing."""
    batch, sizes = _graph_inputs(images, spec)
    return torch.from_numpy(batch), torch.from_numpy(sizes)


def _model_inputs(images):
    return [{"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
             "height": image.shape[0], "width": image.shape[1]} for image in images]


def _eager_instances(model, images):
    """``model.forward``'s CPU Instances per image (every query)."""
    with torch.no_grad():
        return [output["instances"].to("cpu") for output in model(_model_inputs(images))]


def _eager_mask_probabilities(model, images):
    """Per image, float [Q, h, w]: the sigmoid of the mask logits upsampled to the padded
    batch and cropped, i.e. what ``binary_masks`` thresholds."""
    with torch.no_grad():
        batch = model.preprocess_image(_model_inputs(images))
        mask_logits = model.predict_with_masks(batch)[2]
        upsampled = F.interpolate(mask_logits, size=batch.tensor.shape[-2:], mode="bilinear", align_corners=False)
    return [probabilities.sigmoid()[:, :h, :w].numpy()
            for probabilities, (h, w) in zip(upsampled, batch.image_sizes)]


def _mask_mismatches(model, images, instances, detections):
    """Mask pixels where exported and eager masks differ, except near the threshold."""
    count = 0
    for probabilities, eager, exported in zip(_eager_mask_probabilities(model, images), instances, detections):
        clear = np.abs(probabilities - model.mask_threshold) > MASK_PROBABILITY_MARGIN
        count += int(((eager.pred_masks.numpy() != exported.masks) & clear).sum())
    return count


def _exported_detections(run_exported, images, spec):
    batch, sizes = _graph_inputs(images, spec)
    return batch_detections(run_exported(batch, sizes), batch.shape[2:], sizes, [i.shape[:2] for i in images], spec)


def _box_differences(eager_boxes, exported_boxes, image):
    """|exported - eager| per box coordinate (xyxy pixels, [..., 4]) as a fraction of the
    image's width (x) or height (y)."""
    height, width = image.shape[:2]
    sides = np.array([width, height, width, height], np.float64)
    return np.abs(exported_boxes.astype(np.float64) - eager_boxes.astype(np.float64)) / sides


def _per_query(instances, detections, images):
    """(largest box difference, largest score difference, label mismatches) of detections
    compared query by query."""
    boxes = [_box_differences(i.pred_boxes.tensor.numpy(), d.boxes, image).max()
             for i, d, image in zip(instances, detections, images)]
    scores = [np.abs(d.scores - i.scores.numpy()).max() for i, d in zip(instances, detections)]
    labels = [(d.labels != i.pred_classes.numpy()).sum() for i, d in zip(instances, detections)]
    return float(max(boxes)), float(max(scores)), int(sum(labels))


def _nearest_of_class(box, score, label, exported, available, image):
    """(index, box difference, score difference) of the ``available`` exported detection of
    class ``label`` with the smallest max(box difference, score difference) to (``box``,
    ``score``), or None when there is none."""
    candidates = np.flatnonzero(available & (exported.labels == label))
    if not len(candidates):
        return None
    box_differences = _box_differences(box, exported.boxes[candidates], image).max(-1)
    score_differences = np.abs(exported.scores[candidates] - score)
    best = np.argmin(np.maximum(box_differences, score_differences))
    return candidates[best], float(box_differences[best]), float(score_differences[best])


def paired_topk_differences(eager, exported, image):
    """One image's top-k detections, eager (``Instances``) and exported (``Detections``),
    paired as the module docstring says -> (largest box difference, largest score
    difference, eager detections without a pair above the k-th score). The differences are
    those of the pairs and, for an eager detection without a pair, of the nearest exported
    detection of its class."""
    eager_scores = eager.scores.numpy()
    available = np.ones(len(exported), dtype=bool)
    largest_box = largest_score = 0.0
    mismatches = 0
    for box, score, label in zip(eager.pred_boxes.tensor.numpy(), eager_scores, eager.pred_classes.numpy()):
        nearest = _nearest_of_class(box, score, label, exported, available, image)
        if nearest is not None and nearest[1] <= BOX_TOLERANCE and nearest[2] <= SCORE_TOLERANCE:
            available[nearest[0]] = False
        elif score <= eager_scores.min() + SCORE_TOLERANCE:
            continue  # at the k-th score: it may fall out of the exported top-k
        else:
            mismatches += 1
        if nearest is not None:
            largest_box, largest_score = max(largest_box, nearest[1]), max(largest_score, nearest[2])
    return largest_box, largest_score, mismatches


def _per_topk_pair(instances, detections, images):
    """(largest box difference, largest score difference, label mismatches) of top-k
    detections paired by ``paired_topk_differences``."""
    pairings = [paired_topk_differences(i, d, image) for i, d, image in zip(instances, detections, images)]
    boxes, scores, mismatches = zip(*pairings)
    return max(boxes), max(scores), sum(mismatches)


def compare(name, model, run_exported, images, spec):
    """The ``Difference`` between ``model`` (eager, eval mode) and ``run_exported`` (see
    ``exporters.load_exported``) on the batch ``images`` (HWC uint8, network-input size)."""
    instances = _eager_instances(model, images)
    detections = _exported_detections(run_exported, images, spec)
    if spec.topk is None:
        box, score, labels = _per_query(instances, detections, images)
    else:
        box, score, labels = _per_topk_pair(instances, detections, images)
    masks = _mask_mismatches(model, images, instances, detections) if spec.has_masks else None
    return Difference(name=name, sizes=[list(image.shape[:2]) for image in images], box=box, score=score,
                      label_mismatches=labels, mask_mismatches=masks)


def report_lines(differences, format):
    """A table of the differences, one line per batch, and a verdict line."""
    lines = [f"{format} vs eager PyTorch (tolerances: boxes {BOX_TOLERANCE:g} of the image side, "
             f"scores {SCORE_TOLERANCE:g}, labels identical, mask pixels identical unless within "
             f"{MASK_PROBABILITY_MARGIN:g} of the threshold):",
             f"  {'input':<22} {'sizes (h x w)':<24} {'max box diff':>13} {'max score diff':>15} "
             f"{'labels differ':>14} {'mask px differ':>15}"]
    for d in differences:
        sizes = ", ".join(f"{h}x{w}" for h, w in d.sizes)
        masks = "-" if d.mask_mismatches is None else d.mask_mismatches
        lines.append(f"  {d.name:<22} {sizes:<24} {d.box:>13.2e} {d.score:>15.2e} {d.label_mismatches:>14} "
                     f"{masks:>15}")
    passed = all(d.within_tolerance for d in differences)
    lines.append("verification passed" if passed else "verification FAILED: differences above tolerance")
    return lines
