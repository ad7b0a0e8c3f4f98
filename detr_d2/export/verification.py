"""Exported model vs eager PyTorch on the same images: the largest differences.

The eager side is the model as tools/demo.py runs it (``Detr.forward``, fast paths as
configured); the exported side is the graph with detr_d2_deploy's normalisation, padding
and post-processing, i.e. what tools/predict_onnx.py computes. Images are given at their
network-input size (no resize), so both see the same pixels.

Compared per image and query: boxes (xyxy pixels) as a fraction of the image's width or
height, scores, labels.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from detr_d2_deploy.detections import detections_from_outputs
from detr_d2_deploy.images import normalised, padded_batch

__all__ = ["BOX_TOLERANCE", "SCORE_TOLERANCE", "Difference", "compare", "example_batch",
           "verification_images", "verification_sizes", "report_lines"]

BOX_TOLERANCE = 1e-4  # of the image's width (x) or height (y)
SCORE_TOLERANCE = 1e-4


@dataclass
class Difference:
    """The largest differences over one batch: ``box`` (fraction of the image side),
    ``score``, ``label_mismatches`` (queries whose label differs), ``sizes`` (h, w) per image."""

    name: str
    sizes: list
    box: float
    score: float
    label_mismatches: int

    @property
    def within_tolerance(self):
        return self.box <= BOX_TOLERANCE and self.score <= SCORE_TOLERANCE and self.label_mismatches == 0

    def to_json(self):
        return {**asdict(self), "within_tolerance": self.within_tolerance}


def _off_grid(length):
    """``length``, or one more when it is a multiple of 32 (the backbone's stride)."""
    return length + 1 if length % 32 == 0 else length


def verification_sizes(shortest_edge):
    """Three (height, width) network-input sizes near ``shortest_edge`` (800 if 0), none a
    multiple of 32: landscape, portrait, and a smaller landscape one."""
    side = shortest_edge or 800
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


def _eager_detections(model, images):
    """(boxes [B, Q, 4] xyxy pixels, scores [B, Q], labels [B, Q]) of ``model.forward``."""
    inputs = [{"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
               "height": image.shape[0], "width": image.shape[1]} for image in images]
    with torch.no_grad():
        instances = [output["instances"].to("cpu") for output in model(inputs)]
    return (np.stack([i.pred_boxes.tensor.numpy() for i in instances]),
            np.stack([i.scores.numpy() for i in instances]), np.stack([i.pred_classes.numpy() for i in instances]))


def _exported_detections(run_exported, images, spec):
    logits, boxes = run_exported(*_graph_inputs(images, spec))
    detections = [detections_from_outputs(lg, bx, image.shape[:2]) for lg, bx, image in zip(logits, boxes, images)]
    return (np.stack([d.boxes for d in detections]), np.stack([d.scores for d in detections]),
            np.stack([d.labels for d in detections]))


def compare(name, model, run_exported, images, spec):
    """The ``Difference`` between ``model`` (eager, eval mode) and ``run_exported`` (see
    ``exporters.load_exported``) on the batch ``images`` (HWC uint8, network-input size)."""
    eager_boxes, eager_scores, eager_labels = _eager_detections(model, images)
    boxes, scores, labels = _exported_detections(run_exported, images, spec)
    sides = np.array([[w, h, w, h] for h, w in (image.shape[:2] for image in images)], np.float64)[:, None, :]
    return Difference(name=name, sizes=[list(image.shape[:2]) for image in images],
                      box=float((np.abs(boxes.astype(np.float64) - eager_boxes) / sides).max()),
                      score=float(np.abs(scores - eager_scores).max()),
                      label_mismatches=int((labels != eager_labels).sum()))


def report_lines(differences, format):
    """A table of the differences, one line per batch, and a verdict line."""
    lines = [f"{format} vs eager PyTorch (tolerances: boxes {BOX_TOLERANCE:g} of the image side, "
             f"scores {SCORE_TOLERANCE:g}, labels identical):",
             f"  {'input':<22} {'sizes (h x w)':<24} {'max box diff':>13} {'max score diff':>15} {'labels differ':>14}"]
    for d in differences:
        sizes = ", ".join(f"{h}x{w}" for h, w in d.sizes)
        lines.append(f"  {d.name:<22} {sizes:<24} {d.box:>13.2e} {d.score:>15.2e} {d.label_mismatches:>14}")
    passed = all(d.within_tolerance for d in differences)
    lines.append("verification passed" if passed else "verification FAILED: differences above tolerance")
    return lines
