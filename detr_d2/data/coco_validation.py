"""Checks of a COCO-json dataset before training, so defects surface before the first step.

Defects that COCO tools tolerate are counted and logged (handled as COCO tools do):
zero-width/height boxes (dropped by the mapper), boxes beyond the image (clipped),
``iscrowd`` objects (ignored in training, "ignore" regions in evaluation), images
without annotations (kept, all queries learn "no object"), categories without images.
Defects that would crash or silently corrupt a run are errors naming the file and id:
an image id listed twice, duplicate annotation ids, annotations of unknown images or
categories, malformed boxes, missing image files.
"""
import collections
import json
import logging
import os

from detr_d2.data.coco_registration import DatasetError

MAX_LISTED = 5
logger = logging.getLogger("detectron2")


def _load(json_file):
    try:
        with open(json_file) as file:
            return json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"annotation file {json_file} does not exist") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"annotation file {json_file} is not valid JSON ({error}); fix or regenerate it") from None


def _listed(items):
    items = sorted(items)
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(map(str, items[:MAX_LISTED])) + more


def _duplicates(values):
    return [value for value, count in collections.Counter(values).items() if count > 1]


def _check_structure(data, json_file):
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DatasetError(f"{json_file}: missing the '{key}' list of COCO instances json")


def _check_ids(data, json_file):
    image_ids = [image.get("id") for image in data["images"]]
    if _duplicates(image_ids):
        raise DatasetError(f"{json_file}: image id(s) listed more than once: {_listed(_duplicates(image_ids))}; "
                           "give each image one entry with a unique id")
    annotation_ids = [a.get("id") for a in data["annotations"]]
    if _duplicates(annotation_ids):
        raise DatasetError(f"{json_file}: duplicate annotation id(s): {_listed(_duplicates(annotation_ids))}")
    known_images = set(image_ids)
    known_categories = {c.get("id") for c in data["categories"]}
    orphans = [a.get("id") for a in data["annotations"] if a.get("image_id") not in known_images]
    if orphans:
        raise DatasetError(f"{json_file}: annotation id(s) {_listed(orphans)} refer to images not in 'images'")
    unknown = [a.get("id") for a in data["annotations"] if a.get("category_id") not in known_categories]
    if unknown:
        raise DatasetError(f"{json_file}: annotation id(s) {_listed(unknown)} have a category_id not in 'categories'")


def _box_defects(data, json_file):
    """Count handled box defects; raise on malformed boxes."""
    sizes = {image["id"]: (image.get("width"), image.get("height")) for image in data["images"]}
    counts = collections.Counter()
    for annotation in data["annotations"]:
        box = annotation.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DatasetError(f"{json_file}: annotation id {annotation.get('id')} has bbox {box!r}; "
                               "expected [x, y, width, height] numbers")
        x, y, w, h = box
        width, height = sizes[annotation["image_id"]]
        counts["crowd objects (ignored in training)"] += bool(annotation.get("iscrowd", 0))
        counts["zero-size boxes (dropped)"] += w <= 0 or h <= 0
        if width and height:
            counts["boxes beyond the image (clipped)"] += x < 0 or y < 0 or x + w > width or y + h > height
    return counts


def _missing_images(data, image_root):
    return [f"{image.get('file_name')} (id {image.get('id')})" for image in data["images"]
            if not os.path.isfile(os.path.join(image_root, str(image.get("file_name"))))]


def validate_coco_dataset(name, json_file, image_root):
    """Raise DatasetError for fatal defects; log and return counts of the handled ones."""
    data = _load(json_file)
    _check_structure(data, json_file)
    _check_ids(data, json_file)
    counts = _box_defects(data, json_file)
    missing = _missing_images(data, image_root)
    if missing:
        raise DatasetError(f"dataset {name!r}: {len(missing)} image file(s) listed in {json_file} are missing "
                           f"under {image_root}: {_listed(missing)}; fix the image root or the json")
    annotated = {a["image_id"] for a in data["annotations"]}
    used_categories = {a["category_id"] for a in data["annotations"]}
    counts["images without annotations (kept)"] = sum(image["id"] not in annotated for image in data["images"])
    counts["categories without annotations"] = sum(c["id"] not in used_categories for c in data["categories"])
    handled = {k: v for k, v in counts.items() if v}
    if handled:
        logger.info(f"dataset {name!r} ({json_file}): handled as COCO tools do: {handled}")
    return handled
