"""COCO-json datasets registered from the config, and NUM_CLASSES taken from the data.

``DATASETS.REGISTER_COCO`` holds (name, annotation json, image root) triples. Relative
paths are resolved against the current working directory when the config is loaded,
like every other path of a detectron2 config, and written back as absolute paths, so the
run's dumped config.yaml works from any directory. ``detr_d2.engine.build_config`` runs
both steps, after checking that the config's dataset names are registered.
"""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from detr_d2.errors import SetupError


class DatasetError(SetupError, ValueError):
    """A dataset problem found before training; the message names the file/key and the fix."""


def absolute_path(path):
    """``path`` with ``~`` expanded, made absolute (relative to the working directory)."""
    return os.path.abspath(os.path.expanduser(path))


def resolved_registrations(entries):
    """DATASETS.REGISTER_COCO -> tuple of (name, absolute json path, absolute image root)."""
    resolved = []
    for entry in entries:
        if len(entry) != 3 or not all(isinstance(part, str) for part in entry):
            raise DatasetError(f"DATASETS.REGISTER_COCO entry {entry!r} must be "
                               "(name, annotation_json, image_root), three strings")
        name, json_file, image_root = entry
        resolved.append((name, absolute_path(json_file), absolute_path(image_root)))
    return tuple(resolved)


def register_coco_dataset(name, json_file, image_root):
    """Register one dataset; a repeat with the same files is a no-op, other files an error."""
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        registered = (getattr(metadata, "json_file", None), getattr(metadata, "image_root", None))
        if registered == (json_file, image_root):
            return
        raise DatasetError(
            f"dataset name {name!r} in DATASETS.REGISTER_COCO is already registered with "
            f"json_file={registered[0]} image_root={registered[1]}, not {json_file} / {image_root}; "
            "choose another name for these files")
    register_coco_instances(name, {}, json_file, image_root)


def register_coco_datasets_from_config(cfg):
    """Register every DATASETS.REGISTER_COCO entry; makes the entry paths absolute in ``cfg``
    (call before ``cfg.freeze()``). Returns the resolved entries."""
    registrations = resolved_registrations(cfg.DATASETS.REGISTER_COCO)
    for name, json_file, image_root in registrations:
        register_coco_dataset(name, json_file, image_root)
    if not cfg.is_frozen():
        cfg.DATASETS.REGISTER_COCO = registrations
    return registrations


def read_coco_categories(json_file):
    """The ``categories`` list of a COCO json (parse errors name the file)."""
    try:
        with open(json_file) as file:
            data = json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"annotation file {json_file} does not exist; check DATASETS.REGISTER_COCO") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"annotation file {json_file} is not valid JSON ({error}); "
                           "fix or regenerate the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise DatasetError(f"annotation file {json_file} has no 'categories' list; is it COCO instances json?")
    return data["categories"]


def dataset_num_classes(name):
    """Number of object classes of the registered dataset ``name`` (from its metadata or, for
    a COCO json, its categories; the dataset is loaded only when neither names its classes,
    e.g. an LVIS json, whose classes come from detectron2's LVIS metadata)."""
    metadata = MetadataCatalog.get(name)
    if hasattr(metadata, "thing_classes"):
        return len(metadata.thing_classes)
    if hasattr(metadata, "json_file") and metadata.get("evaluator_type", "coco") == "coco":
        return len(read_coco_categories(metadata.json_file))
    DatasetCatalog.get(name)
    if hasattr(metadata, "thing_classes"):
        return len(metadata.thing_classes)
    raise DatasetError(f"dataset {name!r} has no thing_classes metadata; set MODEL.DETR.NUM_CLASSES explicitly")


def num_classes_from_data(dataset_names):
    """The class count shared by the registered datasets ``dataset_names`` (they must agree)."""
    if not dataset_names:
        raise DatasetError("DATASETS.TRAIN is empty: name at least one registered dataset, or set "
                           "MODEL.DETR.NUM_CLASSES explicitly for evaluation-only runs")
    counts = {name: dataset_num_classes(name) for name in dataset_names}
    if len(set(counts.values())) != 1:
        raise DatasetError(f"the training sets disagree on the number of classes: {counts}; "
                           "train on datasets with the same categories")
    return next(iter(counts.values()))


def resolve_num_classes(cfg):
    """Fill MODEL.DETR.NUM_CLASSES from DATASETS.TRAIN (or, when empty, DATASETS.TEST) when
    unset (None), or check it; returns it.

    The datasets must be registered (``build_config`` checks their names first). An
    explicit value that differs from the data is an error naming both numbers.
    """
    configured = cfg.MODEL.DETR.NUM_CLASSES
    names = cfg.DATASETS.TRAIN or cfg.DATASETS.TEST
    if configured is not None and not names:
        return configured
    from_data = num_classes_from_data(names)
    if configured is None:
        cfg.MODEL.DETR.NUM_CLASSES = from_data
    elif configured != from_data:
        raise DatasetError(f"MODEL.DETR.NUM_CLASSES is {configured} but {', '.join(names)} has "
                           f"{from_data} classes; remove the key to take it from the data, or fix it")
    return cfg.MODEL.DETR.NUM_CLASSES
