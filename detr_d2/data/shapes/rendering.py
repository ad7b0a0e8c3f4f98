"""Rendering of one synthetic image: a random background with non-crowding, contrasting shapes.

Shapes are placed one after another on top of each other; a placement is rejected if its
box has IoU > ``MAX_BOX_IOU`` with an earlier box, or if it would leave an earlier object
less than ``MIN_VISIBLE_FRACTION`` of its pixels visible. Every image has its own random
generator (``sample_rng``), so an image does not depend on any other.
"""
import zlib
from dataclasses import dataclass

import numpy as np

from detr_d2.data.shapes.backgrounds import random_background
from detr_d2.data.shapes.colours import contrasting_colour
from detr_d2.data.shapes.outlines import fit_outline, rasterize, shape_outline

MAX_BOX_IOU = 0.3
MIN_VISIBLE_FRACTION = 0.6
PLACEMENT_ATTEMPTS_PER_OBJECT = 30


@dataclass(frozen=True)
class ImageSettings:
    """Geometry of the generated images; sizes are in pixels."""

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 5
    min_size: int = 12
    max_size: int = 60


@dataclass(frozen=True)
class DrawnObject:
    """One shape of a rendered image: its class index, RGB colour and visible-pixel mask."""

    class_index: int
    colour: tuple
    mask: np.ndarray

    def bbox_xywh(self):
        """Tight COCO box [x, y, w, h] (floats, absolute pixels) around the visible mask."""
        ys, xs = np.nonzero(self.mask)
        x0, y0 = int(xs.min()), int(ys.min())
        return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]

    def area(self):
        """Number of visible pixels."""
        return int(np.count_nonzero(self.mask))


def _text_key(text):
    """A stable 32-bit integer for ``text`` (unlike ``hash``, the same in every process)."""
    return zlib.crc32(text.encode("utf-8"))


def sample_rng(seed, split, index, classes):
    """The random generator of image ``index`` of ``split``: independent of every other
    image and split, and different for different class lists."""
    return np.random.default_rng([seed, _text_key(split), _text_key(",".join(classes)), index])


def _box_iou(a, b):
    """IoU of two boxes given as (x0, y0, x1, y1) with exclusive x1, y1."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _mask_box(mask):
    """(x0, y0, x1, y1), exclusive ends, of a non-empty boolean mask."""
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _keeps_others_visible(mask, top_label, full_areas):
    """Whether drawing ``mask`` on top leaves every earlier object enough visible pixels."""
    covered_labels = top_label[mask]
    for label, full_area in enumerate(full_areas):
        visible = np.count_nonzero(top_label == label) - np.count_nonzero(covered_labels == label)
        if visible < MIN_VISIBLE_FRACTION * full_area:
            return False
    return True


def _random_placement(rng, name, settings):
    """Mask of shape ``name`` at a random size and position fully inside the image."""
    size = int(rng.integers(settings.min_size, settings.max_size + 1))
    x0, y0 = rng.integers(0, settings.image_size - size + 1, size=2)
    points = fit_outline(shape_outline(name, rng), size, x0, y0)
    return rasterize(points, settings.image_size)


def render_sample(rng, classes, settings, background=None):
    """Draw one image: shapes on ``background`` (uint8 RGB [S, S, 3], drawn on in place), or
    on a ``random_background`` when None.

    Returns ``(image, objects)``: ``image`` is uint8 RGB (H, W, 3) and ``objects`` a list of
    ``DrawnObject`` whose masks are the pixels each object shows in ``image`` (later objects
    are drawn on top of earlier ones). The object count is drawn from
    [min_objects, max_objects]; if crowding leaves no valid placement for some of them
    after ``PLACEMENT_ATTEMPTS_PER_OBJECT`` tries each, the image has fewer (never none).
    """
    image = random_background(rng, settings.image_size) if background is None else background
    target = int(rng.integers(settings.min_objects, settings.max_objects + 1))
    top_label = np.full(image.shape[:2], -1, dtype=np.int32)
    class_indices, colours, full_areas, boxes = [], [], [], []
    for _ in range(target * PLACEMENT_ATTEMPTS_PER_OBJECT):
        if len(class_indices) == target:
            break
        class_index = int(rng.integers(len(classes)))
        mask = _random_placement(rng, classes[class_index], settings)
        if not mask.any():
            continue
        box = _mask_box(mask)
        if any(_box_iou(box, other) > MAX_BOX_IOU for other in boxes):
            continue
        if not _keeps_others_visible(mask, top_label, full_areas):
            continue
        colour = contrasting_colour(rng, image[mask])
        image[mask] = colour
        top_label[mask] = len(class_indices)
        class_indices.append(class_index)
        colours.append(colour)
        full_areas.append(int(mask.sum()))
        boxes.append(box)
    objects = [
        DrawnObject(class_index=c, colour=colour, mask=top_label == label)
        for label, (c, colour) in enumerate(zip(class_indices, colours))
    ]
    return image, objects
