"""COCO-panoptic datasets registered from the config (``DATASETS.REGISTER_COCO_PANOPTIC``).

An entry is ``(name, panoptic_json, panoptic_png_dir, image_dir)``; relative paths are
resolved against the current working directory and written back absolute, as for
``DATASETS.REGISTER_COCO``. The dataset gets detectron2's "standard" COCO-panoptic
metadata (what ``register_coco_panoptic`` and the builtin ``coco_2017_*_panoptic`` sets
have), so that ``COCOPanopticEvaluator`` and ``Visualizer.draw_panoptic_seg`` work:

* contiguous ids 0..K-1 over ALL categories, things and stuff, in the order of their
  dataset ids (detectron2's COCO order for the builtin sets); K = NUM_CLASSES;
* ``thing_classes`` and ``stuff_classes`` both list all K names (and ``*_colors`` all K
  colours), as detectron2's standard panoptic metadata does;
* ``thing_dataset_id_to_contiguous_id`` (things only), ``stuff_dataset_id_to_contiguous_id``
  (stuff only); ``panoptic_root``, ``panoptic_json``, ``image_root``,
  ``evaluator_type`` "coco_panoptic_seg", ``ignore_label`` 255, ``label_divisor`` 1000.

Records: ``file_name`` (the image as the json's "images" entry names it: any extension,
unlike detectron2 v0.6's loader, which forces ".jpg"), ``image_id``, ``height``,
``width``, ``pan_seg_file_name``, ``segments_info`` (each: ``id``, contiguous
``category_id``, ``isthing``, ``iscrowd``, ``area``, ``bbox``).
"""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from detr_d2.data.coco_registration import DatasetError, absolute_path

__all__ = ["PANOPTIC_EVALUATOR_TYPE", "load_coco_panoptic", "panoptic_metadata",
           "register_coco_panoptic_dataset", "register_panoptic_datasets_from_config",
           "resolved_panoptic_registrations"]

PANOPTIC_EVALUATOR_TYPE = "coco_panoptic_seg"
KEY = "DATASETS.REGISTER_COCO_PANOPTIC"


def resolved_panoptic_registrations(entries):
    """DATASETS.REGISTER_COCO_PANOPTIC -> tuple of (name, json, png dir, image dir), absolute."""
    resolved = []
    for entry in entries:
        if len(entry) != 4 or not all(isinstance(part, str) for part in entry):
            raise DatasetError(f"{KEY} entry {entry!r} must be (name, panoptic_json, panoptic_png_dir, "
                               "image_dir), four strings")
        name, *paths = entry
        resolved.append((name, *map(absolute_path, paths)))
    return tuple(resolved)


def read_panoptic_json(json_file):
    """The parsed panoptic json, with its "images", "annotations" and "categories" lists."""
    try:
        with open(json_file) as file:
            data = json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"panoptic json {json_file} does not exist; check {KEY}") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"panoptic json {json_file} is not valid JSON ({error}); fix or regenerate it") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DatasetError(f"panoptic json {json_file}: missing the '{key}' list of COCO-panoptic json")
    return data


def _colour(category, index):
    """The category's "color", or a fixed colour of its index."""
    colour = category.get("color")
    if isinstance(colour, (list, tuple)) and len(colour) == 3:
        return [int(c) for c in colour]
    return [(index * 67 + 40) % 256, (index * 137 + 90) % 256, (index * 199 + 150) % 256]


def panoptic_metadata(categories):
    """detectron2's standard panoptic metadata of the json's ``categories`` (see module doc)."""
    ordered = sorted(categories, key=lambda c: c["id"])
    names = [c["name"] for c in ordered]
    colours = [_colour(c, i) for i, c in enumerate(ordered)]
    return {
        "thing_classes": names, "stuff_classes": list(names),
        "thing_colors": colours, "stuff_colors": [list(c) for c in colours],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(ordered) if c.get("isthing")},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(ordered) if not c.get("isthing")},
    }


def _segment(segment, metadata):
    """One segments_info entry with its contiguous category_id and isthing."""
    category = segment["category_id"]
    things, stuff = metadata["thing_dataset_id_to_contiguous_id"], metadata["stuff_dataset_id_to_contiguous_id"]
    isthing = category in things
    return {**segment, "category_id": things[category] if isthing else stuff[category],
            "isthing": isthing, "iscrowd": int(segment.get("iscrowd", 0))}


def load_coco_panoptic(json_file, panoptic_root, image_root):
    """Records of a COCO-panoptic dataset (see module doc); images without an annotation
    entry are left out, as detectron2's loader does. Categories are checked by
    ``panoptic_validation`` before this is used for training."""
    data = read_panoptic_json(json_file)
    metadata = panoptic_metadata(data["categories"])
    images = {image["id"]: image for image in data["images"]}
    records = []
    for annotation in data["annotations"]:
        image = images[annotation["image_id"]]
        records.append({
            "file_name": os.path.join(image_root, image["file_name"]),
            "image_id": annotation["image_id"],
            "height": image["height"], "width": image["width"],
            "pan_seg_file_name": os.path.join(panoptic_root, annotation["file_name"]),
            "segments_info": [_segment(s, metadata) for s in annotation["segments_info"]],
        })
    return records


def register_coco_panoptic_dataset(name, json_file, panoptic_root, image_root):
    """Register one panoptic dataset; a repeat with the same files is a no-op, other files
    an error. The metadata is read from the json now (its categories)."""
    files = (json_file, panoptic_root, image_root)
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        registered = tuple(metadata.get(key, None) for key in ("panoptic_json", "panoptic_root", "image_root"))
        if registered == files:
            return
        raise DatasetError(f"dataset name {name!r} in {KEY} is already registered with panoptic_json, "
                           f"panoptic_root, image_root = {registered}, not {files}; choose another name")
    metadata = panoptic_metadata(read_panoptic_json(json_file)["categories"])
    DatasetCatalog.register(name, lambda: load_coco_panoptic(json_file, panoptic_root, image_root))
    MetadataCatalog.get(name).set(panoptic_json=json_file, panoptic_root=panoptic_root, image_root=image_root,
                                  evaluator_type=PANOPTIC_EVALUATOR_TYPE, ignore_label=255,
                                  label_divisor=1000, **metadata)


def register_panoptic_datasets_from_config(cfg):
    """Register every DATASETS.REGISTER_COCO_PANOPTIC entry; makes its paths absolute in
    ``cfg`` (call before ``cfg.freeze()``)."""
    registrations = resolved_panoptic_registrations(cfg.DATASETS.REGISTER_COCO_PANOPTIC)
    for registration in registrations:
        register_coco_panoptic_dataset(*registration)
    if not cfg.is_frozen():
        cfg.DATASETS.REGISTER_COCO_PANOPTIC = registrations
    return registrations
