"""Exported model vs eager PyTorch on the same images: the largest differences.

The eager side is the model as tools/demo.py runs it (``Detr.forward``, fast paths as
configured); the exported side is the graph with detr_d2_deploy's normalisation, padding
and post-processing, i.e. what tools/predict_onnx.py computes. Images are given at their
network-input size (no resize), so both see the same pixels.

Compared per image and query: boxes (xyxy pixels) as a fraction of the image's width or
height, scores, labels; with MODEL.MASK_ON the binary masks, pixel by pixel, except where
the eager mask probability lies within ``MASK_PROBABILITY_MARGIN`` of the threshold.
"""
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from detr_d2_deploy.images import normalised, padded_batch
from detr_d2_deploy.predictor import batch_detections

__all__ = ["BOX_TOLERANCE", "SCORE_TOLERANCE", "Difference", "compare", "example_batch",
           "verification_images", "verification_sizes", "report_lines"]

BOX_TOLERANCE = 1e-4  # of the image's width (x) or height (y)
SCORE_TOLERANCE = 1e-4
MASK_PROBABILITY_MARGIN = 1e-3  # mask pixels this close to the threshold may differ
MIN_SIDE = 64  # verified (and traced) images are larger than 32 px (exporters.MIN_TRACED_SIDE)


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


def verification_sizes(shortest_edge):
    """Three (height, width) network-input sizes near ``shortest_edge`` (800 if 0, at least
    MIN_SIDE), none a multiple of 32: landscape, portrait, and a smaller landscape one."""
    side = max(shortest_edge or 800, MIN_SIDE)
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


def _largest_box_difference(instances, detections, images):
    """The largest |exported - eager| box coordinate, as a fraction of the image side."""
    eager = np.stack([i.pred_boxes.tensor.numpy() for i in instances]).astype(np.float64)
    exported = np.stack([d.boxes for d in detections]).astype(np.float64)
    sides = np.array([[w, h, w, h] for h, w in (image.shape[:2] for image in images)], np.float64)[:, None, :]
    return float((np.abs(exported - eager) / sides).max())


def compare(name, model, run_exported, images, spec):
    """The ``Difference`` between ``model`` (eager, eval mode) and ``run_exported`` (see
    ``exporters.load_exported``) on the batch ``images`` (HWC uint8, network-input size)."""
    instances = _eager_instances(model, images)
    detections = _exported_detections(run_exported, images, spec)
    scores = [np.abs(d.scores - i.scores.numpy()).max() for i, d in zip(instances, detections)]
    labels = [(d.labels != i.pred_classes.numpy()).sum() for i, d in zip(instances, detections)]
    masks = _mask_mismatches(model, images, instances, detections) if spec.has_masks else None
    return Difference(name=name, sizes=[list(image.shape[:2]) for image in images],
                      box=_largest_box_difference(instances, detections, images), score=float(max(scores)),
                      label_mismatches=int(sum(labels)), mask_mismatches=masks)


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
