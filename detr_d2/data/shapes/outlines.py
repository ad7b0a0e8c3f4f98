"""Shape outlines and their rasterisation.

An outline is an (N, 2) float array of polygon vertices (x, y). ``shape_outline`` gives a
randomly proportioned and rotated outline around the origin in arbitrary units;
``fit_outline`` places it in pixel-centre coordinates (pixel (i, j) has its centre at
x = i, y = j); ``rasterize`` fills it into a boolean mask without antialiasing.
"""
import cv2
import numpy as np

KNOWN_SHAPES = ("circle", "ellipse", "rectangle", "triangle", "pentagon", "hexagon", "star", "cross")
SUBPIXEL_BITS = 4  # fixed-point precision of the polygon vertices given to cv2.fillPoly


def _regular_polygon(num_vertices, radii=(1.0,)):
    """Vertices on circles of the given radii (cycled), evenly spaced in angle, first at top."""
    angles = -np.pi / 2 + 2 * np.pi * np.arange(num_vertices) / num_vertices
    r = np.resize(np.asarray(radii, dtype=np.float64), num_vertices)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _cross_outline(half_thickness):
    """12 vertices of a plus sign with arms of half-length 1."""
    t = half_thickness
    return np.array(
        [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1),
         (-t, -1), (-t, -t), (-1, -t), (-1, t), (-t, t), (-t, 1)],
        dtype=np.float64,
    )


def _unrotated_outline(name, rng):
    """Outline of shape ``name`` around the origin, before rotation and scaling."""
    if name in ("circle", "ellipse"):
        minor = 1.0 if name == "circle" else rng.uniform(0.35, 0.7)
        angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack([np.cos(angles), minor * np.sin(angles)], axis=1)
    if name == "rectangle":
        half_height = rng.uniform(0.3, 0.9)
        return np.array([(-1, -half_height), (1, -half_height), (1, half_height), (-1, half_height)])
    if name in ("triangle", "pentagon", "hexagon"):
        return _regular_polygon({"triangle": 3, "pentagon": 5, "hexagon": 6}[name])
    if name == "star":
        return _regular_polygon(10, radii=(1.0, rng.uniform(0.38, 0.5)))
    if name == "cross":
        return _cross_outline(rng.uniform(0.22, 0.36))
    raise ValueError(f"unknown shape {name!r}; known: {', '.join(KNOWN_SHAPES)}")


def shape_outline(name, rng):
    """Randomly proportioned and rotated outline of shape ``name`` as an (N, 2) float array."""
    points = _unrotated_outline(name, rng)
    if name == "circle":
        return points
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T


def fit_outline(points, size, x0, y0):
    """Scale ``points`` so their longer extent spans ``size`` pixels, centred in the square
    whose top-left pixel is (x0, y0). Returns pixel-centre coordinates."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    extent = hi - lo
    scale = (size - 1) / extent.max()
    margin = ((size - 1) - extent * scale) / 2
    return (points - lo) * scale + margin + np.array([x0, y0], dtype=np.float64)


def rasterize(points, image_size):
    """Boolean ``image_size`` x ``image_size`` mask of the filled polygon (no antialiasing)."""
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    fixed_point = np.round(points * (1 << SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [fixed_point], 1, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    return mask.astype(bool)
