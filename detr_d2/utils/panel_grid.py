"""Grids of captioned image panels, the layout of tools/visualize_attention.py's drawings.

Every panel is the image scaled so that its longer side is ``panel_side`` pixels (384 by
default: small images are enlarged, so that boxes and labels stay readable), with a
caption above it; panels are laid out in rows with white gaps.
"""
import functools

import cv2
import numpy as np
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

__all__ = ["CAPTION_HEIGHT", "GAP", "MAX_COLUMNS", "PANEL_SIDE", "PanelImage", "caption_font", "captioned",
           "detection_colours", "detection_labels", "draw_boxes", "grid_of_rows", "mark_points", "panel_size",
           "resized", "wrapped"]

PANEL_SIDE = 384  # pixels of a panel's longer side, by default
CAPTION_HEIGHT = 24
CAPTION_FONT_SIZE = 15  # pixels
GAP = 8  # white pixels between panels
LABEL_FONT_SIZE = 11
MAX_COLUMNS = 6  # panels per grid row when one row holds one panel per detection


def panel_size(height, width, side):
    """(height, width) of a panel: the image scaled to a longer side of ``side`` pixels."""
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resized(image_rgb, size):
    """The image resized to ``size`` (height, width), smooth both ways."""
    shrinking = size[0] < image_rgb.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image_rgb, (size[1], size[0]), interpolation=interpolation)


def detection_colours(count):
    """``count`` RGB colours in [0, 1], detectron2's palette in order (the same detection
    has the same colour in every panel)."""
    palette = colormap(rgb=True, maximum=1)
    return [palette[index % len(palette)] for index in range(count)]


def detection_labels(detections, class_names):
    """"class score%" of each detection (class index when there are no names)."""
    return [f"{class_names[label] if class_names else label} {score:.0%}"
            for label, score in zip(detections.pred_classes.tolist(), detections.scores.tolist())]


def _label_position(box, label, panel_width):
    """(x, y) of a label's top-left corner: the box's top-left corner, moved left when the
    label would leave the panel (its width estimated from LABEL_FONT_SIZE)."""
    x0, y0 = box[:2]
    width = 0.85 * LABEL_FONT_SIZE * len(label)  # points at 100 dpi -> pixels, average glyph
    return max(0.0, min(float(x0), panel_width - width)), float(y0)


def draw_boxes(panel, boxes, labels, colours):
    """The panel with ``boxes`` [n, 4] (xyxy panel pixels) in ``colours``, each with its
    label (None: no labels), drawn by detectron2's Visualizer."""
    visualizer = Visualizer(panel)
    for index, (box, colour) in enumerate(zip(boxes, colours)):
        visualizer.draw_box(box, alpha=1.0, edge_color=colour)
        if labels is not None:
            visualizer.draw_text(labels[index], _label_position(box, labels[index], panel.shape[1]),
                                 font_size=LABEL_FONT_SIZE, color=colour, horizontal_alignment="left")
    return visualizer.get_output().get_image()


def mark_points(panel, points, size=18):
    """The panel with a white-on-black cross of ``size`` pixels at each (x, y) (panel pixels)."""
    panel = panel.copy()
    for x, y in points:
        centre = (int(round(x)), int(round(y)))
        cv2.drawMarker(panel, centre, (0, 0, 0), cv2.MARKER_CROSS, size + 4, 5, cv2.LINE_AA)
        cv2.drawMarker(panel, centre, (255, 255, 255), cv2.MARKER_CROSS, size, 2, cv2.LINE_AA)
    return panel


@functools.lru_cache(maxsize=4)
def caption_font(size=CAPTION_FONT_SIZE):
    """matplotlib's DejaVu Sans at ``size`` pixels (it draws any Unicode class name)."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def captioned(panel, text):
    """The panel below a white strip of CAPTION_HEIGHT with ``text`` in black."""
    strip = Image.new("RGB", (panel.shape[1], CAPTION_HEIGHT), "white")
    ImageDraw.Draw(strip).text((4, CAPTION_HEIGHT // 2), text, fill="black", font=caption_font(), anchor="lm")
    return np.concatenate([np.asarray(strip), panel])


def grid_of_rows(rows):
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


def wrapped(panels, columns):
    """``panels`` cut into rows of at most ``columns``."""
    return [panels[start:start + columns] for start in range(0, len(panels), columns)]


class PanelImage:
    """One image at the panel size with its detections in panel pixels: ``image`` (HWC
    uint8 RGB), ``size`` (height, width), ``scale`` (x, y) from image to panel pixels,
    ``boxes`` [n, 4] xyxy, ``labels`` and ``colours`` (one per detection)."""

    def __init__(self, image_rgb, detections, class_names, panel_side):
        height, width = image_rgb.shape[:2]
        self.size = panel_size(height, width, panel_side)
        self.scale = (self.size[1] / width, self.size[0] / height)
        self.image = resized(image_rgb, self.size)
        self.boxes = detections.pred_boxes.tensor.numpy() * np.array(self.scale * 2)
        self.labels = detection_labels(detections, class_names)
        self.colours = detection_colours(len(detections))

    def to_panel(self, points):
        """[(x, y)] pixels of the image -> the same points in panel pixels."""
        return [(x * self.scale[0], y * self.scale[1]) for x, y in points]

    def overview(self):
        """The image with every detection's box, label and colour."""
        return draw_boxes(self.image, self.boxes, self.labels, self.colours)

    def detection_box(self, panel, index, labelled=False):
        """``panel`` with detection ``index``'s box in its colour (and its label)."""
        labels = self.labels[index:index + 1] if labelled else None
        return draw_boxes(panel, self.boxes[index:index + 1], labels, self.colours[index:index + 1])
