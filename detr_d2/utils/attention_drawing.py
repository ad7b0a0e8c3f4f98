"""Drawings of what DETR attends to (tools/visualize_attention.py): one grid per image.

Every panel is the image scaled so that its longer side is ``panel_side`` pixels (384 by
default: small images are enlarged, so that boxes and labels stay readable), with a
caption above it.
Rows of the grid:

* decoder: the image with every kept detection (box, class, score) drawn by detectron2's
  Visualizer, then, for each detection, the last decoder layer's cross-attention of its
  query as a heat map with that detection's box (its class and score in the caption);
* encoder: the image with the chosen points marked, then, for each point, the last encoder
  layer's self-attention from the feature cell holding that point.

Maps are averaged over the heads, or (``per_head``) drawn one panel per head, a row per
detection and per point. Each heat map is scaled to its own maximum (the colour scale is
relative: compare shapes, not brightness, between panels).
"""
import functools
import re

import cv2
import numpy as np
import torch
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer
from matplotlib import colormaps, font_manager
from PIL import Image, ImageDraw, ImageFont

from detr_d2.errors import SetupError

__all__ = ["CAPTION_HEIGHT", "DEFAULT_POINT_COUNT", "GAP", "MAX_COLUMNS", "PANEL_SIDE", "attention_grid",
           "check_points_inside", "confident_queries", "default_points", "parse_points"]

PANEL_SIDE = 384  # pixels of a panel's longer side, by default
CAPTION_HEIGHT = 24
CAPTION_FONT_SIZE = 15  # pixels
GAP = 8  # white pixels between panels
HEAT_COLORMAP = "inferno"
HEAT_OPACITY = 0.85  # of the colour where the map is at its maximum; less where it is lower
GREY_BRIGHTNESS = 0.8  # the image under a heat map, in grey
LABEL_FONT_SIZE = 11
DEFAULT_POINT_COUNT = 3  # points by default: the centres of this many top detections
MAX_COLUMNS = 6  # panels per grid row when maps are averaged over heads
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


def _panel_size(height, width, side):
    """(height, width) of a panel: the image scaled to a longer side of ``side`` pixels."""
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resized(image_rgb, size):
    """The image resized to ``size`` (height, width), smooth both ways."""
    shrinking = size[0] < image_rgb.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image_rgb, (size[1], size[0]), interpolation=interpolation)


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


def _detection_colours(count):
    """``count`` RGB colours in [0, 1], detectron2's palette in order (the same detection
    has the same colour in every panel)."""
    palette = colormap(rgb=True, maximum=1)
    return [palette[index % len(palette)] for index in range(count)]


def _labels(detections, class_names):
    """"class score%" of each detection (class index when there are no names)."""
    return [f"{class_names[label] if class_names else label} {score:.0%}"
            for label, score in zip(detections.pred_classes.tolist(), detections.scores.tolist())]


def _label_position(box, label, panel_width):
    """(x, y) of a label's top-left corner: the box's top-left corner, moved left when the
    label would leave the panel (its width estimated from LABEL_FONT_SIZE)."""
    x0, y0 = box[:2]
    width = 0.85 * LABEL_FONT_SIZE * len(label)  # points at 100 dpi -> pixels, average glyph
    return max(0.0, min(float(x0), panel_width - width)), float(y0)


def _draw_boxes(panel, boxes, labels, colours):
    """The panel with ``boxes`` [n, 4] (xyxy panel pixels) in ``colours``, each with its
    label (None: no labels), drawn by detectron2's Visualizer."""
    visualizer = Visualizer(panel)
    for index, (box, colour) in enumerate(zip(boxes, colours)):
        visualizer.draw_box(box, alpha=1.0, edge_color=colour)
        if labels is not None:
            visualizer.draw_text(labels[index], _label_position(box, labels[index], panel.shape[1]),
                                 font_size=LABEL_FONT_SIZE, color=colour, horizontal_alignment="left")
    return visualizer.get_output().get_image()


def _mark_points(panel, points):
    """The panel with a white-on-black cross at each (x, y) (panel pixels)."""
    panel = panel.copy()
    for x, y in points:
        centre = (int(round(x)), int(round(y)))
        cv2.drawMarker(panel, centre, (0, 0, 0), cv2.MARKER_CROSS, 22, 5, cv2.LINE_AA)
        cv2.drawMarker(panel, centre, (255, 255, 255), cv2.MARKER_CROSS, 18, 2, cv2.LINE_AA)
    return panel


@functools.lru_cache(maxsize=1)
def _caption_font():
    """matplotlib's DejaVu Sans at CAPTION_FONT_SIZE (it draws any Unicode class name)."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), CAPTION_FONT_SIZE)


def _captioned(panel, text):
    """The panel below a white strip of CAPTION_HEIGHT with ``text`` in black."""
    strip = Image.new("RGB", (panel.shape[1], CAPTION_HEIGHT), "white")
    ImageDraw.Draw(strip).text((4, CAPTION_HEIGHT // 2), text, fill="black", font=_caption_font(), anchor="lm")
    return np.concatenate([np.asarray(strip), panel])


def _grid(rows):
    """HWC uint8: ``rows`` (lists of equally sized panels) one under the other, left-aligned,
    GAP white pixels around every panel."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    grid = np.full((GAP + len(rows) * (height + GAP), GAP + columns * (width + GAP), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            top, left = GAP + r * (height + GAP), GAP + c * (width + GAP)
            grid[top:top + height, left:left + width] = panel
    return grid


def _wrapped(panels, columns):
    """``panels`` cut into rows of at most ``columns``."""
    return [panels[start:start + columns] for start in range(0, len(panels), columns)]


class _Figure:
    """The panels of one image: the scaled image, the detections' boxes, labels and colours
    in panel pixels, the attention maps upsampled to the panel size."""

    def __init__(self, image_rgb, detections, class_names, attention, panel_side):
        height, width = image_rgb.shape[:2]
        self.size = _panel_size(height, width, panel_side)
        self.scale = (self.size[1] / width, self.size[0] / height)
        self.image = _resized(image_rgb, self.size)
        self.boxes = detections.pred_boxes.tensor.numpy() * np.array(self.scale * 2)
        self.labels = _labels(detections, class_names)
        self.colours = _detection_colours(len(detections))
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
            return _draw_boxes(self.image, self.boxes[index:index + 1], self.labels[index:index + 1],
                               self.colours[index:index + 1])
        return _draw_boxes(_heat_overlay(self.image, heat), self.boxes[index:index + 1], None,
                           self.colours[index:index + 1])

    def point_panel(self, point, heat=None):
        """The point (x, y) of the original image marked, on its heat map when given."""
        image = self.image if heat is None else _heat_overlay(self.image, heat)
        return _mark_points(image, [(point[0] * self.scale[0], point[1] * self.scale[1])])


def _decoder_rows(figure, queries, per_head):
    """Grid rows of the decoder's cross-attention of each detection's query (one row with
    the image alone when nothing was detected)."""
    overview = _captioned(_draw_boxes(figure.image, figure.boxes, figure.labels, figure.colours),
                          f"{len(queries)} detections")
    if not len(queries):
        return [[overview]]
    heat = figure.heat_maps(figure.attention.decoder[:, queries], per_head)
    if per_head:
        return [[_captioned(figure.detection_panel(i), f"query {int(query)}: {figure.labels[i]}")]
                + [_captioned(figure.detection_panel(i, head_map), f"query {int(query)}, head {head}")
                   for head, head_map in enumerate(heat[i])]
                for i, query in enumerate(queries)]
    panels = [_captioned(figure.detection_panel(i, heat[i, 0]), f"query {int(query)}: {figure.labels[i]}")
              for i, query in enumerate(queries)]
    return _wrapped([overview] + panels, MAX_COLUMNS)


def _encoder_rows(figure, points, per_head):
    """Grid rows of the encoder's self-attention from each point (x, y) of the original image."""
    maps = torch.stack([figure.attention.encoder_from(x, y) for x, y in points], dim=1)
    heat = figure.heat_maps(maps, per_head)
    names = [f"({x:.0f}, {y:.0f})" for x, y in points]
    if per_head:
        return [[_captioned(figure.point_panel(point), f"encoder from {name}")]
                + [_captioned(figure.point_panel(point, head_map), f"{name}, head {head}")
                   for head, head_map in enumerate(heat[i])]
                for i, (point, name) in enumerate(zip(points, names))]
    overview = _mark_points(figure.image, [(x * figure.scale[0], y * figure.scale[1]) for x, y in points])
    panels = [_captioned(overview, f"{len(points)} points")]
    panels += [_captioned(figure.point_panel(point, heat[i, 0]), f"encoder attention from {name}")
               for i, (point, name) in enumerate(zip(points, names))]
    return _wrapped(panels, MAX_COLUMNS)


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
    return _grid(_decoder_rows(figure, queries, per_head) + _encoder_rows(figure, points, per_head))
