"""Drawings of where the multi-scale DETRs (DeformableDetr, Dino) look: their deformable
attention's sampling points (tools/visualize_attention.py), one grid per image.

Panels as in ``panel_grid``. Rows of the grid:

* decoder: the image with every kept detection drawn by detectron2's Visualizer, a legend,
  then, for each detection, its query's sampling points in the last decoder layer's
  cross-attention: the detection's box in its colour, the query's reference point (a
  cross) and, when the reference is a box (box refinement, two-stage, DINO's anchors), that
  reference box dashed;
* encoder: the image with the chosen points marked, then, for each point, the sampling
  points of the last encoder layer's query at the finest level's cell holding it (its
  reference point, the cell's centre, as a cross).

Each sampling point is a disc coloured by its feature level, its area proportional to its
attention weight and more opaque the heavier it is, scaled to the heaviest point drawn in
the panel, over the image in grey; lighter points are drawn first. Panels show every head
together, or (``per_head``) one panel per head, a row per detection and per point.
``levels`` restricts the points drawn to those feature levels.
"""
import math

import cv2
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from detr_d2.errors import SetupError
from detr_d2.utils.panel_grid import (
    MAX_COLUMNS,
    PANEL_SIDE,
    PanelImage,
    caption_font,
    captioned,
    grid_of_rows,
    mark_points,
    wrapped,
)

__all__ = ["check_levels", "parse_levels", "sampling_grid"]

LEVEL_COLOURS = [tuple(int(255 * c) for c in colormaps["tab10"](index)[:3]) for index in (0, 1, 2, 3, 4, 6, 9)]
GREY_BRIGHTNESS = 0.75  # the image under the points, in grey
MAX_RADIUS = 1 / 36  # of the panel's longer side: the heaviest point's disc
MIN_RADIUS = 1.5  # pixels: the lightest points stay visible
MIN_OPACITY = 0.35  # of the lightest points; 1 for the heaviest
DASH = 6  # pixels of each dash of a reference box
MARKER_SIZE = 1 / 24  # of the panel's longer side: the reference point's cross (8 pixels at least)


def parse_levels(text):
    """--levels "0,2" -> [0, 2] (sorted, distinct); SetupError for anything else."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise SetupError(f"--levels {text!r} is not a list of feature level indices: write them as \"0,2\"")
    return sorted({int(part) for part in parts})


def check_levels(levels, num_levels, model_name):
    """SetupError when the model (``model_name``, reading ``num_levels`` feature levels;
    None: one feature map, no deformable attention) does not have all of ``levels``."""
    if num_levels is None:
        raise SetupError(f"--levels: {model_name} reads one feature map; --levels applies to the deformable "
                         "attention of DeformableDetr and Dino")
    for level in levels:
        if level >= num_levels:
            raise SetupError(f"--levels: the model has {num_levels} feature levels (0 to {num_levels - 1}, "
                             f"MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS), not level {level}")


def _grey(image_rgb):
    """HWC float32: the image in grey, dimmed to GREY_BRIGHTNESS."""
    grey = cv2.cvtColor(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return grey.astype(np.float32) * GREY_BRIGHTNESS


def _blend_disc(canvas, centre, radius, colour, opacity):
    """Blend an antialiased disc with a dark rim into ``canvas`` (HWC float32) in place."""
    x, y = centre
    reach = int(math.ceil(radius + 2))
    top, bottom = max(0, int(y) - reach), min(canvas.shape[0], int(y) + reach + 1)
    left, right = max(0, int(x) - reach), min(canvas.shape[1], int(x) + reach + 1)
    if top >= bottom or left >= right:
        return
    rows, cols = np.mgrid[top:bottom, left:right].astype(np.float32)
    distance = np.hypot(cols + 0.5 - x, rows + 0.5 - y)
    fill = np.clip(radius + 0.5 - distance, 0, 1)[..., None] * opacity
    rim = np.clip(1 - np.abs(distance - radius), 0, 1)[..., None] * opacity
    patch = canvas[top:bottom, left:right]
    patch[:] = patch * (1 - fill) + np.array(colour, np.float32) * fill
    patch[:] = patch * (1 - rim)


def _draw_samples(canvas, xy, weights, levels, panel_side):
    """Draw the points ``xy`` [n, 2] (panel pixels) of ``weights`` [n] and feature
    ``levels`` [n] onto ``canvas`` (HWC float32), lightest first (of equal weights, the
    coarser level first: finer levels' points lie closer to the reference)."""
    if not len(weights):
        return
    heaviest = float(weights.max())
    largest = MAX_RADIUS * panel_side
    order = sorted(range(len(weights)), key=lambda i: (float(weights[i]), -int(levels[i])))
    for index in order:
        share = float(weights[index]) / heaviest if heaviest > 0 else 0.0
        radius = max(MIN_RADIUS, largest * math.sqrt(share))
        opacity = MIN_OPACITY + (1 - MIN_OPACITY) * share
        colour = LEVEL_COLOURS[int(levels[index]) % len(LEVEL_COLOURS)]
        _blend_disc(canvas, xy[index].tolist(), radius, colour, opacity)


def _dashed_box(panel, box):
    """The panel with the xyxy ``box`` (panel pixels) dashed white on black."""
    x0, y0, x1, y1 = box
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    for (ax, ay), (bx, by) in zip(corners, corners[1:]):
        length = max(math.hypot(bx - ax, by - ay), 1e-6)
        for start in np.arange(0, length, 2 * DASH):
            end = min(start + DASH, length)
            a = (int(round(ax + (bx - ax) * start / length)), int(round(ay + (by - ay) * start / length)))
            b = (int(round(ax + (bx - ax) * end / length)), int(round(ay + (by - ay) * end / length)))
            cv2.line(panel, a, b, (0, 0, 0), 4, cv2.LINE_AA)
            cv2.line(panel, a, b, (255, 255, 255), 2, cv2.LINE_AA)
    return panel


class _SamplingFigure(PanelImage):
    """The panels of one image: the scaled image, the detections in panel pixels, the
    ``ImageSampling`` and the levels drawn."""

    def __init__(self, image_rgb, detections, class_names, sampling, levels, panel_side):
        super().__init__(image_rgb, detections, class_names, panel_side)
        self.sampling = sampling
        self.levels = levels
        self.grey = _grey(self.image)
        self.panel_side = panel_side

    def points_panel(self, locations, weights, reference, head=None):
        """The sampling points of one query: ``locations`` [M, L, P, 2] (image pixels),
        ``weights`` [M, L, P], of every head or only ``head``, on the grey image with the
        ``reference`` point [2] or box [4] (cx, cy, w, h)."""
        heads = range(weights.shape[0]) if head is None else [head]
        levels = torch.arange(weights.shape[1])[None, :, None].expand_as(weights)
        chosen = torch.zeros_like(weights, dtype=torch.bool)
        chosen[list(heads)] = True
        chosen &= torch.isin(levels, torch.tensor(self.levels))
        xy = locations[chosen] * torch.tensor(self.scale)
        canvas = self.grey.copy()
        _draw_samples(canvas, xy, weights[chosen], levels[chosen], self.panel_side)
        panel = canvas.round().clip(0, 255).astype(np.uint8)
        scale = torch.tensor(self.scale)
        centre = reference[:2] * scale
        if reference.shape[0] == 4:
            half = reference[2:] * scale / 2
            _dashed_box(panel, torch.cat([centre - half, centre + half]).tolist())
        return mark_points(panel, [centre.tolist()], max(8, round(MARKER_SIZE * self.panel_side)))

    def detection_panel(self, index, query, head=None):
        """Detection ``index`` (made by ``query``): its sampling points and its box."""
        sampling = self.sampling
        panel = self.points_panel(sampling.decoder_locations[query], sampling.decoder_weights[query],
                                  sampling.decoder_references[query], head)
        return self.detection_box(panel, index)

    def encoder_panel(self, point, head=None):
        """The sampling points of the encoder position holding ``point`` (x, y image pixels)."""
        sampling = self.sampling
        position = sampling.encoder_position_at(*point)
        return self.points_panel(sampling.encoder_locations[position], sampling.encoder_weights[position],
                                 sampling.encoder_references[position], head)

    def legend(self, reference_is_box):
        """A white panel naming the level colours and the marks."""
        height, width = self.size
        font = caption_font(max(10, round(min(height, width) / 22)))
        line = round(font.size * 1.6)
        legend = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(legend)
        sampling = self.sampling
        entries = [(LEVEL_COLOURS[level % len(LEVEL_COLOURS)],
                    f"level {level}: stride {sampling.strides()[level]}, {rows}x{cols} cells")
                   for level, (rows, cols) in enumerate(sampling.valid_cells.tolist()) if level in self.levels]
        y = line // 2
        radius = font.size // 2
        for colour, text in entries:
            draw.ellipse((8, y - radius, 8 + 2 * radius, y + radius), fill=colour, outline="black")
            draw.text((16 + 2 * radius, y), text, fill="black", font=font, anchor="lm")
            y += line
        heads, _, points = sampling.decoder_weights.shape[1:]
        notes = [f"{heads} heads x {points} points per level", "disc area and opacity: weight",
                 "cross: reference point"] + (["dashed: reference box"] if reference_is_box else [])
        for text in notes:
            draw.text((8, y), text, fill="black", font=font, anchor="lm")
            y += line
        return np.asarray(legend)


def _decoder_rows(figure, detection_indices, queries, per_head):
    """Grid rows of the decoder's sampling points of each detection (one row with the image
    and the legend when nothing was detected)."""
    reference_is_box = figure.sampling.decoder_references.shape[-1] == 4
    head = [captioned(figure.overview(), f"{len(detection_indices)} detections"),
            captioned(figure.legend(reference_is_box), "sampling points")]
    labels = [f"query {int(query)}: {figure.labels[i]}" for i, query in zip(detection_indices, queries)]
    if per_head:
        heads = figure.sampling.decoder_weights.shape[1]
        return [head] + [[captioned(figure.detection_panel(i, query), label)]
                         + [captioned(figure.detection_panel(i, query, h), f"query {int(query)}, head {h}")
                            for h in range(heads)]
                         for i, query, label in zip(detection_indices, queries, labels)]
    panels = [captioned(figure.detection_panel(i, query), label)
              for i, query, label in zip(detection_indices, queries, labels)]
    return wrapped(head + panels, MAX_COLUMNS)


def _encoder_rows(figure, points, per_head):
    """Grid rows of the encoder's sampling points from each point (x, y) of the image."""
    names = [f"({x:.0f}, {y:.0f})" for x, y in points]
    if per_head:
        heads = figure.sampling.encoder_weights.shape[1]
        return [[captioned(figure.encoder_panel(point), f"encoder at {name}")]
                + [captioned(figure.encoder_panel(point, h), f"{name}, head {h}") for h in range(heads)]
                for point, name in zip(points, names)]
    panels = [captioned(mark_points(figure.image, figure.to_panel(points)), f"{len(points)} points")]
    panels += [captioned(figure.encoder_panel(point), f"encoder at {name}") for point, name in zip(points, names)]
    return wrapped(panels, MAX_COLUMNS)


def sampling_grid(image_rgb, instances, detections, queries, sampling, points, class_names=None, per_head=False,
                  panel_side=PANEL_SIDE, levels=None):
    """HWC uint8 RGB: the grid of one image (see the module docstring).

    image_rgb: HWC uint8, the original image; instances: the model's detections
    (``pred_boxes`` xyxy pixels of ``image_rgb``); detections: [n] indices of those to
    draw, best first (``attention_drawing.confident_queries``); queries: [len(instances)]
    the query of each detection (``analysis.detection_queries``); sampling: the image's
    ``ImageSampling``; points: [(x, y)] pixels of ``image_rgb`` for the encoder rows;
    class_names: the model's classes (None: indices); levels: feature levels to draw
    (None: all)."""
    levels = list(range(sampling.num_levels)) if levels is None else list(levels)
    figure = _SamplingFigure(image_rgb, instances[detections], class_names, sampling, levels, panel_side)
    rows = _decoder_rows(figure, range(len(detections)), queries[detections].tolist(), per_head)
    return grid_of_rows(rows + _encoder_rows(figure, points, per_head))
