"""The panoptic shapes dataset (``prepare_shapes.py --preset panoptic``), in COCO-panoptic format.

Each 128-px image is a landscape of stuff regions and shapes on top:

* stuff: "sky" above a wavy horizon (a vertical blue gradient), below it "ground"
  (grainy brown or green) and, in most images, "water" (blue-green with horizontal
  ripples) beside or below the ground behind a second wavy border; some images have no
  sky. Each stuff class present is one segment (as COCO's stuff).
* things: the shapes of ``PANOPTIC_THINGS`` drawn as in the detection presets
  (``rendering.render_sample``), one segment each; in some images a crowd (4-6 small
  shapes of one class close together) is one segment with ``iscrowd`` 1.
* void (id 0, no segment): a 1-2 px band along every border between stuff regions, as
  COCO annotators leave edges unlabelled, and in some images an unlabelled blob.

Category ids are not contiguous: things 1, 3, 5, ... in ``PANOPTIC_THINGS`` order, stuff
100, 102, 104. Segment k (k = 1, 2, ...) has id k * ``SEGMENT_ID_STEP`` = k * 65793, i.e.
R = G = B = k in the PNG (id = R + 256 G + 256² B), so the decoding uses every channel.

Layout of ``output_dir``::

    images/<split>/000000.png           (image id = file index + 1)
    panoptic/<split>/000000.png         (the segment ids as RGB)
    annotations/panoptic_<split>.json   (COCO-panoptic: images, annotations, categories)
    manifest.json                       (the arguments; written last)

Deterministic like the detection presets: every image from its own generator
(``sample_rng`` with the class list extended by "panoptic"); a run whose manifest matches
and whose files exist is skipped. The detection presets' output is unchanged.
"""
import json
import os

import cv2
import numpy as np

from detr_d2.data.shapes.colours import contrasting_colour
from detr_d2.data.shapes.generation import _validate, manifest_matches
from detr_d2.data.shapes.outlines import fit_outline, rasterize, shape_outline
from detr_d2.data.shapes.rendering import ImageSettings, render_sample, sample_rng
from detr_d2.data.shapes.writer import _json_bytes, _png_bytes, image_file_name, write_atomic

__all__ = ["PANOPTIC_STUFF", "PANOPTIC_THINGS", "generate_panoptic_dataset", "panoptic_categories",
           "render_panoptic_sample"]

PANOPTIC_VERSION = 1
PANOPTIC_THINGS = ("circle", "ellipse", "rectangle", "triangle", "pentagon", "hexagon")
PANOPTIC_STUFF = ("sky", "ground", "water")
STUFF_IDS = (100, 102, 104)
SEGMENT_ID_STEP = 1 + 256 + 256 ** 2  # segment k: R = G = B = k
STUFF_COLOURS = ([110, 170, 240], [120, 90, 50], [40, 110, 170])
CROWD_PROBABILITY = 0.15
VOID_BLOB_PROBABILITY = 0.3
SKY, GROUND, WATER = range(3)


def panoptic_categories(things):
    """COCO-panoptic categories: things 1, 3, 5, ... (isthing 1), then the stuff ids."""
    colours = cv2.applyColorMap(np.linspace(0, 255, len(things), dtype=np.uint8)[:, None],
                                cv2.COLORMAP_JET)[:, 0, ::-1]
    categories = [{"id": 2 * i + 1, "name": name, "supercategory": "shape", "isthing": 1,
                   "color": [int(c) for c in colours[i]]} for i, name in enumerate(things)]
    categories += [{"id": cid, "name": name, "supercategory": "landscape", "isthing": 0, "color": colour}
                   for cid, name, colour in zip(STUFF_IDS, PANOPTIC_STUFF, STUFF_COLOURS)]
    return categories


def _wavy(rng, size, low, high):
    """A wavy border: one coordinate per position along the other axis, float [size]."""
    base = rng.uniform(low, high) * size
    amplitude, period = rng.uniform(1, 7), rng.uniform(40, 120)
    return base + amplitude * np.sin(2 * np.pi * np.arange(size) / period + rng.uniform(0, 2 * np.pi))


def _stuff_regions(rng, size):
    """Stuff index per pixel [S, S] int (SKY / GROUND / WATER)."""
    ys, xs = np.mgrid[0:size, 0:size]
    regions = np.full((size, size), GROUND)
    if rng.random() < 0.85:
        regions[ys < _wavy(rng, size, 0.25, 0.6)[None, :]] = SKY
    layout = rng.random()
    if layout < 0.35:
        border = _wavy(rng, size, 0.3, 0.7)[:, None]
        water = xs < border if rng.random() < 0.5 else xs >= border
    elif layout < 0.7:
        water = ys >= _wavy(rng, size, 0.65, 0.85)[None, :]
    else:
        water = np.zeros((size, size), dtype=bool)
    regions[water & (regions != SKY)] = WATER
    return regions


def _texture(rng, kind, size):
    """float32 RGB [S, S, 3] texture of a stuff class."""
    ys = np.arange(size, dtype=np.float32)[:, None, None] / size
    if kind == SKY:
        top = np.array([rng.uniform(60, 140), rng.uniform(130, 190), rng.uniform(200, 255)], dtype=np.float32)
        image = top + ys * np.float32(rng.uniform(30, 60)) + np.zeros((size, size, 3), np.float32)
        return image + 2 * rng.standard_normal((size, size, 3), dtype=np.float32)
    if kind == GROUND:
        base = np.array([120, 90, 50] if rng.random() < 0.5 else [70, 120, 50], dtype=np.float32)
        cells = (base + rng.uniform(-25, 25, size=(6, 6, 3))).astype(np.float32)
        image = cv2.resize(cells, (size, size), interpolation=cv2.INTER_CUBIC)
        return image + 14 * rng.standard_normal((size, size, 3), dtype=np.float32)
    base = np.array([rng.uniform(20, 60), rng.uniform(90, 130), rng.uniform(150, 200)], dtype=np.float32)
    xs = np.arange(size, dtype=np.float32)[None, :]
    ripples = np.sin(2 * np.pi * (ys[..., 0] * size / rng.uniform(4, 8)) + 0.3 * np.sin(xs / 9))
    return base + np.float32(rng.uniform(12, 25)) * ripples[..., None] + 3 * rng.standard_normal(
        (size, size, 3), dtype=np.float32)


def _border_void(regions):
    """Pixels within a pixel of a border between two stuff regions (bool [S, S])."""
    edge = np.zeros(regions.shape, dtype=bool)
    edge[:-1] |= regions[:-1] != regions[1:]
    edge[1:] |= regions[:-1] != regions[1:]
    edge[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    edge[:, 1:] |= regions[:, :-1] != regions[:, 1:]
    return edge


def _crowd(rng, image, classes):
    """A crowd of 4-6 small shapes of one class drawn on ``image``: (class index, mask)."""
    size = image.shape[0]
    class_index = int(rng.integers(len(classes)))
    centre = rng.integers(20, size - 20, size=2)
    mask = np.zeros(image.shape[:2], dtype=bool)
    for _ in range(int(rng.integers(4, 7))):
        side = int(rng.integers(6, 11))
        x0, y0 = (centre + rng.integers(-14, 15, size=2) - side // 2).clip(0, size - side)
        mask |= rasterize(fit_outline(shape_outline(classes[class_index], rng), side, x0, y0), size)
    image[mask] = contrasting_colour(rng, image[mask])
    return class_index, mask


def _void_blob(rng, image):
    """An unlabelled ellipse in a random colour drawn on ``image``; its mask."""
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    centre = tuple(int(v) for v in rng.integers(10, size - 10, size=2))
    axes = tuple(int(v) for v in rng.integers(4, 10, size=2))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    image[mask.astype(bool)] = rng.integers(0, 256, size=3)
    return mask.astype(bool)


def render_panoptic_sample(rng, classes, settings):
    """One image and its segments.

    Returns ``(image, segments)``: uint8 RGB [S, S, 3] and a list of ``(mask, category
    index, iscrowd)`` with bool [S, S] masks that do not overlap; category index i < len(classes)
    is thing ``classes[i]``, len(classes) + j is stuff ``PANOPTIC_STUFF[j]``. Pixels in no
    mask are void.
    """
    size = settings.image_size
    regions = _stuff_regions(rng, size)
    textures = np.stack([_texture(rng, kind, size) for kind in range(len(PANOPTIC_STUFF))])
    image = np.take_along_axis(textures, regions[None, :, :, None], axis=0)[0]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    labelled = ~_border_void(regions)
    if rng.random() < VOID_BLOB_PROBABILITY:
        labelled &= ~_void_blob(rng, image)
    crowd = _crowd(rng, image, classes) if rng.random() < CROWD_PROBABILITY else None
    image, objects = render_sample(rng, classes, settings, background=image)
    things = np.zeros((size, size), dtype=bool)
    for obj in objects:
        things |= obj.mask
    segments = []
    if crowd is not None:
        crowd_mask = crowd[1] & ~things
        segments.append((crowd_mask, crowd[0], 1))
        things |= crowd[1]
    segments += [(obj.mask, obj.class_index, 0) for obj in objects]
    for kind in range(len(PANOPTIC_STUFF)):
        segments.append(((regions == kind) & labelled & ~things, len(classes) + kind, 0))
    return image, [segment for segment in segments if segment[0].any()]


def _ids_png(ids):
    """RGB PNG bytes of segment ids [S, S] (R + 256 G + 256² B)."""
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    return _png_bytes(rgb)


def _segment_info(segment_id, mask, category_id, iscrowd):
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": segment_id, "category_id": category_id, "iscrowd": iscrowd,
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "area": int(mask.sum())}


def _write_panoptic_split(output_dir, split, num_images, classes, settings, seed):
    """Render and write one split's images, PNGs and json; returns the json path."""
    folders = {kind: os.path.join(output_dir, kind, split) for kind in ("images", "panoptic")}
    for folder in (*folders.values(), os.path.join(output_dir, "annotations")):
        os.makedirs(folder, exist_ok=True)
    categories = panoptic_categories(classes)
    images, annotations = [], []
    for index in range(num_images):
        image, segments = render_panoptic_sample(sample_rng(seed, split, index, [*classes, "panoptic"]),
                                                 classes, settings)
        ids = np.zeros(image.shape[:2], dtype=np.int64)
        infos = []
        for k, (mask, category, iscrowd) in enumerate(segments, start=1):
            ids[mask] = k * SEGMENT_ID_STEP
            infos.append(_segment_info(k * SEGMENT_ID_STEP, mask, categories[category]["id"], iscrowd))
        name = image_file_name(index)
        write_atomic(os.path.join(folders["images"], name), _png_bytes(image))
        write_atomic(os.path.join(folders["panoptic"], name), _ids_png(ids))
        images.append({"id": index + 1, "file_name": name, "width": settings.image_size,
                       "height": settings.image_size})
        annotations.append({"image_id": index + 1, "file_name": name, "segments_info": infos})
    data = {"info": {"description": f"synthetic panoptic shapes ({split})", "version": PANOPTIC_VERSION},
            "images": images, "annotations": annotations, "categories": categories}
    json_path = os.path.join(output_dir, "annotations", f"panoptic_{split}.json")
    write_atomic(json_path, _json_bytes(data))
    print(f"[prepare_shapes] {split}: {num_images} panoptic images, "
          f"{sum(len(a['segments_info']) for a in annotations)} segments -> {json_path}")
    return json_path


def _is_cached(output_dir, manifest):
    """Whether ``output_dir`` holds a complete panoptic set made with exactly ``manifest``."""
    return manifest_matches(output_dir, manifest) and all(
        os.path.isfile(os.path.join(output_dir, "annotations", f"panoptic_{split}.json")) and
        all(os.path.isfile(os.path.join(output_dir, kind, split, image_file_name(i)))
            for kind in ("images", "panoptic") for i in range(n))
        for split, n in manifest["splits"].items())


def generate_panoptic_dataset(output_dir, classes, splits, image_size=128, min_objects=1,
                              max_objects=5, min_size=12, max_size=60, seed=0, force=False):
    """Write the panoptic shapes dataset (module doc) with things ``classes`` (e.g.
    ``PANOPTIC_THINGS``) to ``output_dir`` unless an identical one is there; arguments as
    ``generate_dataset``. Returns ``{split: path of its panoptic json}``."""
    classes = list(classes)
    splits = {str(s): int(n) for s, n in splits.items()}
    settings = ImageSettings(image_size, min_objects, max_objects, min_size, max_size)
    _validate(classes, splits, settings, seed)
    if max_objects + 1 + len(PANOPTIC_STUFF) > 255:
        raise ValueError("max_objects must be at most 251: segment ids are k * 65793 for k < 256")
    manifest = json.loads(json.dumps({"panoptic_version": PANOPTIC_VERSION, "classes": classes,
                                      "stuff": list(PANOPTIC_STUFF), "splits": splits, "seed": seed,
                                      **settings.__dict__}))
    json_paths = {s: os.path.join(output_dir, "annotations", f"panoptic_{s}.json") for s in splits}
    if not force and _is_cached(output_dir, manifest):
        print(f"[prepare_shapes] {output_dir} is up to date, skipping generation")
        return json_paths
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    for split, num_images in splits.items():
        _write_panoptic_split(output_dir, split, num_images, classes, settings, seed)
    write_atomic(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    return json_paths
