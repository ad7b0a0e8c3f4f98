"""Class names written beside converted weights, and read back where no dataset names them.

tools/convert_detr_checkpoint.py writes ``<weights without .pth>.metadata.json`` when the
source names its classes (a transformers model's ``id2label``; COCO heads reduced to
detectron2's contiguous classes): ``{"thing_classes": [names in contiguous order],
"thing_dataset_id_to_contiguous_id": {"<source label id>": contiguous id}, "source": ...}``.
tools/demo.py (``metadata_beside_weights``) and evaluation (``fill_missing_class_names``)
take the names from it when no dataset of the config, or the evaluated one, has
``thing_classes``.
"""
import json
import logging
import os

from detectron2.data import MetadataCatalog

from detr_d2.checkpoint.io import atomic_write

__all__ = ["fill_missing_class_names", "metadata_beside_weights", "metadata_path", "read_class_metadata",
           "write_class_metadata"]

logger = logging.getLogger("detectron2")
SUFFIX = ".metadata.json"


def metadata_path(weights_path):
    """``detr_r50.pth`` -> ``detr_r50.metadata.json`` (same folder)."""
    return os.path.splitext(weights_path)[0] + SUFFIX


def write_class_metadata(weights_path, class_names, dataset_ids, source):
    """Write the class names of ``weights_path`` beside it (atomically); returns the path."""
    data = {"thing_classes": list(class_names),
            "thing_dataset_id_to_contiguous_id": {str(i): n for n, i in enumerate(dataset_ids)},
            "source": str(source)}
    path = metadata_path(weights_path)
    atomic_write(path, lambda f: json.dump(data, f, indent=1), binary=False)
    return path


def read_class_metadata(weights_path):
    """(thing_classes, {dataset id: contiguous id}) written beside ``weights_path``, or None."""
    if not weights_path or "://" in weights_path:
        return None
    path = metadata_path(weights_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        names = [str(name) for name in data["thing_classes"]]
        ids = {int(i): int(n) for i, n in data.get("thing_dataset_id_to_contiguous_id", {}).items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(f"Ignoring the class names of {path}: unreadable ({error})")
        return None
    return names, ids


def metadata_beside_weights(weights_path, num_classes=None):
    """A MetadataCatalog entry with the class names written beside ``weights_path``
    (``thing_classes``, ``thing_dataset_id_to_contiguous_id``), or None when there are none
    or their count is not ``num_classes``."""
    found = read_class_metadata(weights_path)
    if found is None:
        return None
    names, ids = found
    if num_classes is not None and len(names) != num_classes:
        logger.warning(f"Ignoring the {len(names)} class names of {metadata_path(weights_path)}: the model "
                       f"predicts {num_classes} classes")
        return None
    metadata = MetadataCatalog.get(f"__detr_d2_weights__{os.path.abspath(weights_path)}")
    if not metadata.get("thing_classes"):
        metadata.set(thing_classes=names, thing_dataset_id_to_contiguous_id=ids or {i: i for i in range(len(names))})
    logger.info(f"Class names from {metadata_path(weights_path)} ({len(names)} classes)")
    return metadata


def fill_missing_class_names(cfg, dataset_name):
    """Give ``dataset_name`` the class names written beside MODEL.WEIGHTS when its metadata
    names no classes (and their count is MODEL.DETR.NUM_CLASSES); evaluators read them."""
    metadata = MetadataCatalog.get(dataset_name)
    if metadata.get("thing_classes", None):
        return
    found = read_class_metadata(cfg.MODEL.WEIGHTS)
    if found is None or len(found[0]) != cfg.MODEL.DETR.NUM_CLASSES:
        return
    names, ids = found
    metadata.set(thing_classes=names)
    if not metadata.get("thing_dataset_id_to_contiguous_id", None):
        metadata.set(thing_dataset_id_to_contiguous_id=ids or {i: i for i in range(len(names))})
    logger.info(f"Dataset {dataset_name!r} names no classes: using the {len(names)} names of "
                f"{metadata_path(cfg.MODEL.WEIGHTS)}")
