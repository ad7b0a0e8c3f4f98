"""A whole shapes dataset: argument checks, the manifest that makes reruns free, all splits."""
import json
import os
import re
from dataclasses import asdict

from detr_d2.data.shapes.outlines import KNOWN_SHAPES
from detr_d2.data.shapes.rendering import ImageSettings
from detr_d2.data.shapes.writer import GENERATOR_VERSION, image_file_name, write_atomic, write_split


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


def manifest_matches(output_dir, manifest):
    """Whether ``output_dir/manifest.json`` exists and equals ``manifest``."""
    try:
        with open(os.path.join(output_dir, "manifest.json"), "rb") as f:
            return json.load(f) == manifest
    except (OSError, ValueError):
        return False


def _is_cached(output_dir, manifest):
    """Whether ``output_dir`` holds a complete dataset made with exactly ``manifest``."""
    return (manifest_matches(output_dir, manifest) and
            all(_split_files_exist(output_dir, s, n) for s, n in manifest["splits"].items()))


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
    ``output_dir/images/<split>/``. The manifest (the arguments) is written last.
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
    write_atomic(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    return json_paths
