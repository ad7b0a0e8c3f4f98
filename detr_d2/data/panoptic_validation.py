"""Checks of a COCO-panoptic dataset before training, so its defects surface before the first step.

Errors (``PanopticDataError``, one line naming the file and the id): an image id listed
twice, an annotation of an unknown image, two annotations of one image, a segment id
listed twice in one image, a segment of an unknown category, a missing PNG or image
file, a PNG whose size differs from its image's, a PNG that cannot be read, a listed
segment id absent from its PNG. Pixels of ids the json does not list are void, like
id 0 (panopticapi ignores them too); they are counted and logged.

Reading every PNG of COCO train (118k files) would take many minutes, so PNG contents
are checked for at most ``PNG_CHECK_LIMIT`` annotations (all of them for COCO val and
custom sets of that size); beyond it only their headers (the size) are read here, and the
mapper checks each PNG's segment ids as it reads it, with the same message.
"""
import collections
import logging
import os

import numpy as np
from PIL import Image

from detr_d2.data.coco_panoptic import read_panoptic_json
from detr_d2.data.coco_registration import DatasetError

__all__ = ["PNG_CHECK_LIMIT", "PanopticDataError", "check_segment_ids", "read_panoptic_png",
           "validate_panoptic_dataset"]

PNG_CHECK_LIMIT = 10000
MAX_LISTED = 5
logger = logging.getLogger("detectron2")


class PanopticDataError(DatasetError):
    """A defect of a COCO-panoptic json or of its PNGs, naming the file and the id."""


def read_panoptic_png(path):
    """Segment ids [H, W] int64 of a panoptic PNG: R + 256 * G + 256**2 * B (0 = void).

    Raises:
        PanopticDataError: missing or unreadable file, or not an RGB image.
    """
    if not os.path.isfile(path):
        raise PanopticDataError(f"panoptic PNG {path} does not exist")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.int64)
    except OSError as error:
        raise PanopticDataError(f"panoptic PNG {path} cannot be read ({error}); regenerate it") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def check_segment_ids(ids, segments_info, png_file):
    """Every listed segment id must occur in ``ids`` (the PNG's id map)."""
    present = set(np.unique(ids).tolist())
    absent = [s["id"] for s in segments_info if s["id"] not in present]
    if absent:
        raise PanopticDataError(f"panoptic PNG {png_file}: segment id(s) {_listed(absent)} listed in its "
                                "segments_info do not occur in the PNG; fix the json or the PNG")
    return present


def _listed(items):
    items = sorted(items)
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(map(str, items[:MAX_LISTED])) + more


def _check_json(data, json_file):
    """Ids, image links and categories of the json (no file is read)."""
    image_ids = [image.get("id") for image in data["images"]]
    twice = [i for i, n in collections.Counter(image_ids).items() if n > 1]
    if twice:
        raise PanopticDataError(f"{json_file}: image id(s) {_listed(twice)} listed more than once")
    known_images, categories = set(image_ids), {c.get("id") for c in data["categories"]}
    annotated = collections.Counter(a.get("image_id") for a in data["annotations"])
    for annotation in data["annotations"]:
        where = f"{json_file}: annotation of {annotation.get('file_name')} (image_id {annotation.get('image_id')})"
        if annotation.get("image_id") not in known_images:
            raise PanopticDataError(f"{where} refers to an image not in 'images'")
        if annotated[annotation["image_id"]] > 1:
            raise PanopticDataError(f"{where} is one of {annotated[annotation['image_id']]} annotations of "
                                    "that image; give each image one annotation")
        segment_ids = [s.get("id") for s in annotation["segments_info"]]
        if len(set(segment_ids)) != len(segment_ids):
            raise PanopticDataError(f"{where}: segment id(s) listed twice: "
                                    f"{_listed(i for i, n in collections.Counter(segment_ids).items() if n > 1)}")
        unknown = [s.get("id") for s in annotation["segments_info"] if s.get("category_id") not in categories]
        if unknown:
            raise PanopticDataError(f"{where}: segment id(s) {_listed(unknown)} have a category_id not in "
                                    "'categories'")


def _png_size(path):
    """(width, height) of an image file from its header; PanopticDataError if missing."""
    if not os.path.isfile(path):
        raise PanopticDataError(f"panoptic PNG {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise PanopticDataError(f"panoptic PNG {path} cannot be read ({error}); regenerate it") from None


def _check_files(data, panoptic_root, image_root, counts):
    """Image files exist, PNG sizes match; PNG contents for the first PNG_CHECK_LIMIT."""
    images = {image["id"]: image for image in data["images"]}
    for index, annotation in enumerate(data["annotations"]):
        image = images[annotation["image_id"]]
        image_file = os.path.join(image_root, str(image.get("file_name")))
        if not os.path.isfile(image_file):
            raise PanopticDataError(f"image file {image_file} (image_id {image['id']}) does not exist; "
                                    "check the image folder of the dataset")
        png_file = os.path.join(panoptic_root, str(annotation.get("file_name")))
        size = (image.get("width"), image.get("height"))
        if index >= PNG_CHECK_LIMIT:
            if _png_size(png_file) != size:
                raise PanopticDataError(f"panoptic PNG {png_file} is {_png_size(png_file)} (width, height) but "
                                        f"image_id {image['id']} is {size}; the PNG must have the image's size")
            continue
        ids = read_panoptic_png(png_file)
        if (ids.shape[1], ids.shape[0]) != size:
            raise PanopticDataError(f"panoptic PNG {png_file} is {ids.shape[1]}x{ids.shape[0]} (width x height) "
                                    f"but image_id {image['id']} is {size[0]}x{size[1]}; the PNG must have the "
                                    "image's size")
        present = check_segment_ids(ids, annotation["segments_info"], png_file)
        listed = {s["id"] for s in annotation["segments_info"]}
        counts["PNGs with pixels of unlisted ids (void)"] += bool(present - listed - {0})
        counts["crowd segments (kept as targets)"] += sum(bool(s.get("iscrowd", 0)) for s in annotation["segments_info"])


def validate_panoptic_dataset(name, json_file, panoptic_root, image_root):
    """Raise PanopticDataError for the defects of the module doc; log and return counts of
    what is handled (void pixels of unlisted ids, crowd segments, images without annotation)."""
    data = read_panoptic_json(json_file)
    _check_json(data, json_file)
    counts = collections.Counter()
    _check_files(data, panoptic_root, image_root, counts)
    counts["images without annotation (left out)"] = len(data["images"]) - len(data["annotations"])
    handled = {k: v for k, v in counts.items() if v}
    if handled:
        logger.info(f"dataset {name!r} ({json_file}): {handled}")
    return handled
