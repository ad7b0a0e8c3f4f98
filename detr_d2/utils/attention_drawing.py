"""Drawings of what DETR attends to (tools/visualize_attention.py): one grid per image.

Every panel is the image scaled to a longer side of ``panel_side`` pixels, with a caption
above it (``panel_grid``). Rows of the grid:

* decoder: the image with every kept detection (box, class, score) drawn by detectron2's
  Visualizer, then, for each detection, the last decoder layer's cross-attention of its
  query as a heat map with that detection's box (its class and score in the caption);
* encoder: the image with the chosen points marked, then, for each point, the last encoder
  layer's self-attention from the feature cell holding that point.

Maps are averaged over the heads, or (``per_head``) drawn one panel per head, a row per
detection and per point. Each heat map is scaled to its own maximum (the colour scale is
relative: compare shapes, not brightness, between panels).
"""
import re

import cv2
import numpy as np
import torch
from matplotlib import colormaps

from detr_d2.errors import SetupError
from detr_d2.utils.panel_grid import (
    CAPTION_HEIGHT,
    GAP,
    MAX_COLUMNS,
    PANEL_SIDE,
    PanelImage,
    captioned,
    grid_of_rows,
    mark_points,
    wrapped,
)

__all__ = ["CAPTION_HEIGHT", "DEFAULT_POINT_COUNT", "GAP", "MAX_COLUMNS", "PANEL_SIDE", "attention_grid",
           "check_points_inside", "confident_queries", "default_points", "parse_points"]

HEAT_COLORMAP = "inferno"
HEAT_OPACITY = 0.85  # of the colour where the map is at its maximum; less where it is lower
GREY_BRIGHTNESS = 0.8  # the image under a heat map, in grey
DEFAULT_POINT_COUNT = 3  # points by default: the centres of this many top detections
POINT_PATTERN = re.compile(r"\s*(-?\d+(?:\.\d*)?)\s*,\s*(-?\d+(?:\.\d*)?)\s*")


def parse_points(text):
    """--points "x,y;x,y" -> [(x, y)] floats (pixels of the input images); SetupError for
    anything else."""
    matches = [POINT_PATTERN.fullmatch(part) for part in text.split(";")]
    if not all(matches):
        raise SetupError(f"--points {text!r} is not a list of x,y pixel positions: write them as "
                         "\"x,y;x,y\", e.g. --points \"64,40;20,100\"")
    return [(float(match[1]), float(match[2])) for match in matches]


def check_points_inside(points, height, width, path):
    """SetupError naming the first point outside the ``height`` x ``width`` image ``path``."""
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise SetupError(f"--points: ({x:g}, {y:g}) is outside {path} ({width}x{height} pixels: "
                             f"x from 0 to {width - 1}, y from 0 to {height - 1}); give points inside every image")


def confident_queries(instances, threshold):
    """[n] int64: indices of the queries of ``instances`` (every query, in query order)
    scoring at least ``threshold``, highest score first."""
    kept = torch.nonzero(instances.scores >= threshold).flatten()
    return kept[instances.scores[kept].argsort(descending=True)]


def default_points(detections, height, width):
    """Box centres (x, y) of up to ``DEFAULT_POINT_COUNT`` of ``detections`` (highest score
    first), skipping a detection whose centre lies in the box of one already taken (a
    duplicate of the same object); the image centre when there are none."""
    points, taken_boxes = [], []
    for centre, box in zip(detections.pred_boxes.get_centers().tolist(), detections.pred_boxes.tensor.tolist()):
        if len(points) == DEFAULT_POINT_COUNT:
            break
        if not any(x0 <= centre[0] <= x1 and y0 <= centre[1] <= y1 for x0, y0, x1, y1 in taken_boxes):
            points.append(tuple(centre))
            taken_boxes.append(box)
    return points or [(width / 2, height / 2)]


def _heat_overlay(image_rgb, heat):
    """HWC uint8: ``heat`` [H, W] (>= 0, scaled to its maximum) coloured with HEAT_COLORMAP
    over the image in grey, opaque in proportion to the value (the image shows where it is
    low; grey, so that the colours read as the map's alone)."""
    level = heat.clamp(min=0).numpy()
    level = level / max(float(level.max()), 1e-12)
    colours = colormaps[HEAT_COLORMAP](level)[..., :3] * 255.0
    grey = cv2.cvtColor(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB) * GREY_BRIGHTNESS
    opacity = HEAT_OPACITY * level[..., None]
    return (grey * (1.0 - opacity) + colours * opacity).round().astype(np.uint8)


class _Figure(PanelImage):
    """The panels of one image: the scaled image, the detections' boxes, labels and colours
    in panel pixels, the attention maps upsampled to the panel size."""

    def __init__(self, image_rgb, detections, class_names, attention, panel_side):
        super().__init__(image_rgb, detections, class_names, panel_side)
        self.attention = attention

    def heat_maps(self, maps, per_head):
        """maps [heads, n, rows, cols] -> [n, heads or 1, H, W] at the panel size (averaged
        over the heads unless ``per_head``)."""
        maps = maps if per_head else maps.mean(0, keepdim=True)
        return self.attention.to_image(maps, self.size).transpose(0, 1)

    def detection_panel(self, index, heat=None):
        """Detection ``index``'s box on its heat map (the caption names it), or labelled
        on the image when no heat map is given."""
        if heat is None:
            return self.detection_box(self.image, index, labelled=True)
        return self.detection_box(_heat_overlay(self.image, heat), index)

    def point_panel(self, point, heat=None):
        """The point (x, y) of the original image marked, on its heat map when given."""
        image = self.image if heat is None else _heat_overlay(self.image, heat)
        return mark_points(image, self.to_panel([point]))


def _decoder_rows(figure, queries, per_head):
    """Grid rows of the decoder's cross-attention of each detection's query (one row with
    the image alone when nothing was detected)."""
    overview = captioned(figure.overview(), f"{len(queries)} detections")
    if not len(queries):
        return [[overview]]
    heat = figure.heat_maps(figure.attention.decoder[:, queries], per_head)
    if per_head:
        return [[captioned(figure.detection_panel(i), f"query {int(query)}: {figure.labels[i]}")]
                + [captioned(figure.detection_panel(i, head_map), f"query {int(query)}, head {head}")
                   for head, head_map in enumerate(heat[i])]
                for i, query in enumerate(queries)]
    panels = [captioned(figure.detection_panel(i, heat[i, 0]), f"query {int(query)}: {figure.labels[i]}")
              for i, query in enumerate(queries)]
    return wrapped([overview] + panels, MAX_COLUMNS)


def _encoder_rows(figure, points, per_head):
    """Grid rows of the encoder's self-attention from each point (x, y) of the original image."""
    maps = torch.stack([figure.attention.encoder_from(x, y) for x, y in points], dim=1)
    heat = figure.heat_maps(maps, per_head)
    names = [f"({x:.0f}, {y:.0f})" for x, y in points]
    if per_head:
        return [[captioned(figure.point_panel(point), f"encoder from {name}")]
                + [captioned(figure.point_panel(point, head_map), f"{name}, head {head}")
                   for head, head_map in enumerate(heat[i])]
                for i, (point, name) in enumerate(zip(points, names))]
    overview = mark_points(figure.image, figure.to_panel(points))
    panels = [captioned(overview, f"{len(points)} points")]
    panels += [captioned(figure.point_panel(point, heat[i, 0]), f"encoder attention from {name}")
               for i, (point, name) in enumerate(zip(points, names))]
    return wrapped(panels, MAX_COLUMNS)


def attention_grid(image_rgb, instances, queries, attention, points, class_names=None, per_head=False,
                   panel_side=PANEL_SIDE):
    """HWC uint8 RGB: the grid of one image (see the module docstring).

    image_rgb: HWC uint8, the original image; instances: the model's ``Instances`` of every
    query (``pred_boxes`` xyxy pixels of ``image_rgb``); queries: [n] int64 indices of the
    detections to draw (``confident_queries``); attention: its ``ImageAttention`` with
    ``output_size`` the image's size; points: [(x, y)] pixels of ``image_rgb`` for the
    encoder maps; class_names: the model's classes (None: indices); panel_side: pixels of
    a panel's longer side."""
    detections = instances[queries]
    figure = _Figure(image_rgb, detections, class_names, attention, panel_side)
    return grid_of_rows(_decoder_rows(figure, queries, per_head) + _encoder_rows(figure, points, per_head))
