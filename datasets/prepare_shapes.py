"""Deterministic synthetic shape-detection datasets in COCO format.

Each image (``image_size`` x ``image_size`` RGB PNG, 128 px by default) has a random
smooth background (a colour gradient or smooth colour noise, with a little pixel noise)
and ``min_objects`` to ``max_objects`` flat-coloured shapes whose longer box side is
``min_size`` to ``max_size`` px. Shapes are randomly rotated (except circles), coloured
to contrast with whatever lies under them, and may partially overlap: a placement is
rejected if its box has IoU > ``MAX_BOX_IOU`` with an earlier box, or if it would leave
an earlier object less than ``MIN_VISIBLE_FRACTION`` of its pixels visible.

Known shapes: circle, ellipse, rectangle, triangle, pentagon, hexagon, star, cross
(a plus sign). Presets (``PRESETS``):

* ``pretrain``: circle, ellipse, rectangle, triangle, pentagon, hexagon
* ``custom``:   star, cross (two classes absent from ``pretrain``, for fine-tuning)

Layout of ``output_dir``::

    images/<split>/000000.png ...     (image id = file index + 1)
    annotations/<split>.json          (COCO, one per split)
    manifest.json                     (the arguments; written last)

Box convention: COCO ``bbox`` = [x, y, w, h] in absolute pixels (floats), where (x, y)
is the top-left corner of the top-left covered pixel and w, h count pixels, so the box
is exactly tight around the object's *visible* (after occlusion) pixels.
``area`` is the number of visible pixels of the object (its mask area), not w*h.
Category ids start at 1 in the order of the class list; supercategory is "shape".

Output is a pure function of the arguments: every image is drawn from its own random
generator seeded by (seed, split name, class list, index), so the same arguments give byte-identical
json and PNG files, and a split does not depend on the sizes of the other splits.
A run whose manifest matches and whose files all exist is skipped. Every file is written
to a temporary name in its folder and then renamed, so an interrupted run never leaves a
half-written file under a final name.

Usage::

    python datasets/prepare_shapes.py --preset pretrain --splits train:2000,val:200
    python datasets/prepare_shapes.py --preset custom --output /tmp/shapes_custom
    python datasets/prepare_shapes.py --classes star,circle --output DIR --seed 3

or from Python: ``generate_dataset(output_dir, PRESETS["custom"], {"train": 500})``.
"""
import argparse
import json
import os
import re
import sys
import zlib
from dataclasses import asdict, dataclass

import cv2
import numpy as np

GENERATOR_VERSION = 1
PRESETS = {
    "pretrain": ("circle", "ellipse", "rectangle", "triangle", "pentagon", "hexagon"),
    "custom": ("star", "cross"),
}
KNOWN_SHAPES = ("circle", "ellipse", "rectangle", "triangle", "pentagon", "hexagon", "star", "cross")
DEFAULT_SPLITS = {"train": 2000, "val": 200}

MAX_BOX_IOU = 0.3
MIN_VISIBLE_FRACTION = 0.6
MIN_CONTRAST = 100.0  # smallest RGB distance between a shape and any pixel it covers
PLACEMENT_ATTEMPTS_PER_OBJECT = 30
COLOUR_ATTEMPTS = 64
COLOUR_BIN = 8  # RGB quantisation step used when measuring contrast
SUBPIXEL_BITS = 4  # fixed-point precision of the polygon vertices given to cv2.fillPoly
TEMPORARY_NAME = r"\..+\.\d+\.tmp"  # what _write_atomic writes before renaming


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


# ----------------------------------------------------------------------------- shapes


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


# ------------------------------------------------------------------------ backgrounds


def _gradient_background(rng, image_size):
    """Linear blend of two random colours along a random direction, as float32 RGB."""
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.arange(image_size, dtype=np.float32)
    t = coords[None, :] * np.float32(np.cos(angle)) + coords[:, None] * np.float32(np.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return start + t[..., None] * (end - start)


def _smooth_noise_background(rng, image_size):
    """Bicubically upsampled coarse grid of colours near a random base colour, as float32 RGB."""
    cells = int(rng.integers(2, 6))
    base = rng.uniform(40, 215, size=3)
    grid = (base + rng.uniform(-50, 50, size=(cells, cells, 3))).astype(np.float32)
    return cv2.resize(grid, (image_size, image_size), interpolation=cv2.INTER_CUBIC)


def random_background(rng, image_size):
    """A smooth random background with mild pixel noise, as uint8 RGB."""
    make = _gradient_background if rng.random() < 0.5 else _smooth_noise_background
    background = make(rng, image_size)
    noise_level = np.float32(rng.uniform(0, 6))
    background += noise_level * rng.standard_normal(background.shape, dtype=np.float32)
    return np.clip(np.rint(background), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- layout


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


def _distinct_colour_bins(pixels):
    """Centres of the RGB bins (``COLOUR_BIN`` wide per channel) hit by ``pixels``, as
    (K, 3) floats: a small stand-in for the set of colours, off by at most ~7 in distance."""
    rgb = pixels.reshape(-1, 3).astype(np.int32) // COLOUR_BIN
    packed = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    bins = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1)
    return (bins + 0.5) * COLOUR_BIN


def _contrasting_colour(rng, covered_pixels):
    """A random RGB colour at least ``MIN_CONTRAST`` away from every pixel in
    ``covered_pixels`` (the first of ``COLOUR_ATTEMPTS`` candidates that is, else the
    farthest candidate)."""
    candidates = rng.integers(0, 256, size=(COLOUR_ATTEMPTS, 3))
    covered = _distinct_colour_bins(covered_pixels)
    squared = ((candidates[:, None, :] - covered[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    passing = np.flatnonzero(squared >= MIN_CONTRAST ** 2)
    best = passing[0] if passing.size else int(np.argmax(squared))
    return tuple(int(c) for c in candidates[best])


def _random_placement(rng, name, settings):
    """Mask of shape ``name`` at a random size and position fully inside the image."""
    size = int(rng.integers(settings.min_size, settings.max_size + 1))
    x0, y0 = rng.integers(0, settings.image_size - size + 1, size=2)
    points = fit_outline(shape_outline(name, rng), size, x0, y0)
    return rasterize(points, settings.image_size)


def render_sample(rng, classes, settings):
    """Draw one image.

    Returns ``(image, objects)``: ``image`` is uint8 RGB (H, W, 3) and ``objects`` a list of
    ``DrawnObject`` whose masks are the pixels each object shows in ``image`` (later objects
    are drawn on top of earlier ones). The object count is drawn from
    [min_objects, max_objects]; if crowding leaves no valid placement for some of them
    after ``PLACEMENT_ATTEMPTS_PER_OBJECT`` tries each, the image has fewer (never none).
    """
    image = random_background(rng, settings.image_size)
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
        colour = _contrasting_colour(rng, image[mask])
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


# ---------------------------------------------------------------------------- output


def _write_atomic(path, data):
    """Write ``data`` (bytes) to ``path`` via a temporary file in the same folder."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def _json_bytes(obj):
    """Deterministic json encoding."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _png_bytes(image_rgb):
    """PNG encoding of an RGB image."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def image_file_name(index):
    """File name of image ``index`` of a split, e.g. ``000042.png``."""
    return f"{index:06d}.png"


def _categories(classes):
    """COCO categories: ids from 1 in the order of ``classes``."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]


def _remove_stale_images(image_dir, expected_names):
    """Delete numbered PNGs in ``image_dir`` that are not in ``expected_names``, and
    temporary files that an interrupted run left behind."""
    for name in os.listdir(image_dir):
        numbered_png = re.fullmatch(r"\d+\.png", name)
        if (numbered_png and name not in expected_names) or re.fullmatch(TEMPORARY_NAME, name):
            os.remove(os.path.join(image_dir, name))


def write_split(output_dir, split, num_images, classes, settings, seed):
    """Render and write the images and COCO json of one split; returns the json path."""
    image_dir = os.path.join(output_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_sample(sample_rng(seed, split, index, classes), classes, settings)
        file_name = image_file_name(index)
        _write_atomic(os.path.join(image_dir, file_name), _png_bytes(image))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name,
                       "width": settings.image_size, "height": settings.image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj.class_index + 1, "bbox": obj.bbox_xywh(),
                                "area": obj.area(), "iscrowd": 0})
    _remove_stale_images(image_dir, {image["file_name"] for image in images})
    coco = {"info": {"description": f"synthetic shapes ({split})", "version": GENERATOR_VERSION},
            "images": images, "annotations": annotations, "categories": _categories(classes)}
    json_path = os.path.join(output_dir, "annotations", f"{split}.json")
    _write_atomic(json_path, _json_bytes(coco))
    print(f"[prepare_shapes] {split}: {num_images} images, {len(annotations)} objects -> {json_path}")
    return json_path


def _manifest(classes, splits, settings, seed):
    """The json-normalised record of everything that determines the output."""
    record = {"generator_version": GENERATOR_VERSION, "classes": list(classes),
              "splits": dict(splits), "seed": seed, **asdict(settings)}
    return json.loads(json.dumps(record))


def _split_files_exist(output_dir, split, num_images):
    """Whether the json and all images of a split are present."""
    if not os.path.isfile(os.path.join(output_dir, "annotations", f"{split}.json")):
        return False
    image_dir = os.path.join(output_dir, "images", split)
    return all(os.path.isfile(os.path.join(image_dir, image_file_name(i))) for i in range(num_images))


def _is_cached(output_dir, manifest):
    """Whether ``output_dir`` holds a complete dataset made with exactly ``manifest``."""
    try:
        with open(os.path.join(output_dir, "manifest.json"), "rb") as f:
            if json.load(f) != manifest:
                return False
    except (OSError, ValueError):
        return False
    return all(_split_files_exist(output_dir, s, n) for s, n in manifest["splits"].items())


def _validate(classes, splits, settings, seed):
    """Raise ValueError on arguments that cannot produce a valid dataset."""
    unknown = [c for c in classes if c not in KNOWN_SHAPES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {KNOWN_SHAPES}, got {list(classes)}")
    if not splits or any(not re.fullmatch(r"[\w.-]+", s) or int(n) < 0 for s, n in splits.items()):
        raise ValueError(f"splits must map simple names to image counts >= 0, got {splits}")
    if not 1 <= settings.min_objects <= settings.max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    if not 2 <= settings.min_size <= settings.max_size <= settings.image_size:
        raise ValueError("need 2 <= min_size <= max_size <= image_size")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def generate_dataset(output_dir, classes, splits, image_size=128, min_objects=1, max_objects=5,
                     min_size=12, max_size=60, seed=0, force=False):
    """Write a COCO-format shape dataset to ``output_dir`` unless an identical one is there.

    ``classes``: shape names (see ``KNOWN_SHAPES``, ``PRESETS``), category ids 1..n in order.
    ``splits``: split name -> number of images, e.g. ``{"train": 2000, "val": 200}``.
    ``force``: regenerate even if the manifest matches.
    Returns ``{split: path of its COCO json}``; images of a split are in
    ``output_dir/images/<split>/``.
    """
    classes = list(classes)
    splits = {str(s): int(n) for s, n in splits.items()}
    settings = ImageSettings(image_size, min_objects, max_objects, min_size, max_size)
    _validate(classes, splits, settings, seed)
    json_paths = {s: os.path.join(output_dir, "annotations", f"{s}.json") for s in splits}
    manifest = _manifest(classes, splits, settings, seed)
    manifest_path = os.path.join(output_dir, "manifest.json")
    if not force and _is_cached(output_dir, manifest):
        print(f"[prepare_shapes] {output_dir} is up to date, skipping generation")
        return json_paths
    os.makedirs(output_dir, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    for split, num_images in splits.items():
        write_split(output_dir, split, num_images, classes, settings, seed)
    _write_atomic(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    return json_paths


# ------------------------------------------------------------------------------- CLI


def parse_splits(text):
    """Parse ``train:2000,val:200`` into ``{"train": 2000, "val": 200}``."""
    splits = {}
    for item in text.split(","):
        name, sep, count = item.strip().partition(":")
        if not sep or not name or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad split {item!r}; expected NAME:COUNT")
        splits[name] = int(count)
    return splits


def parse_classes(text):
    """Parse ``star,circle`` into a list of known shape names."""
    classes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in classes if c not in KNOWN_SHAPES]
    if not classes or unknown:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown}; known: {', '.join(KNOWN_SHAPES)}")
    return classes


def _presets_epilog():
    """Help text listing the presets."""
    lines = [f"  {name}: {', '.join(classes)}" for name, classes in PRESETS.items()]
    return "presets:\n" + "\n".join(lines)


def build_parser():
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=_presets_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS), help="named class list")
    which.add_argument("--classes", type=parse_classes, help=f"comma list from {','.join(KNOWN_SHAPES)}")
    parser.add_argument("--output", help="output folder (default: datasets/shapes_<preset or classes>)")
    parser.add_argument("--splits", type=parse_splits, default=dict(DEFAULT_SPLITS),
                        help="NAME:COUNT list (default: train:2000,val:200)")
    defaults = ImageSettings()
    for option, help_text in (("--image-size", "square image side (px)"),
                              ("--min-objects", "objects per image, at least"),
                              ("--max-objects", "objects per image, at most"),
                              ("--min-size", "smallest object: longer side of its box (px)"),
                              ("--max-size", "largest object: longer side of its box (px)")):
        default = getattr(defaults, option[2:].replace("-", "_"))
        parser.add_argument(option, type=int, default=default, help=f"{help_text}; default {default}")
    parser.add_argument("--seed", type=int, default=0, help="same seed and arguments, same files")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser


def main(argv=None):
    """CLI entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    classes = list(PRESETS[args.preset]) if args.preset else args.classes
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "shapes_" + (args.preset or "-".join(classes)))
    try:
        generate_dataset(output, classes, args.splits, image_size=args.image_size,
                         min_objects=args.min_objects, max_objects=args.max_objects,
                         min_size=args.min_size, max_size=args.max_size, seed=args.seed,
                         force=args.force)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
