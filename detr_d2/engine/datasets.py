"""The datasets of a run: their names checked, their records loaded and checked.

``check_dataset_names`` is the one check that a dataset name of the config is registered
(``build_config`` runs it); ``load_dataset_dicts`` reads a dataset's records for training,
evaluation and the tools, and refuses a missing annotation file, an empty dataset and
missing or empty image files with a ``SetupError`` naming the dataset and the files.
"""
import difflib
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from detr_d2.data import validate_coco_dataset
from detr_d2.data.coco_panoptic import PANOPTIC_EVALUATOR_TYPE
from detr_d2.data.panoptic_validation import validate_panoptic_dataset
from detr_d2.errors import SetupError

__all__ = ["check_dataset_names", "load_dataset_dicts"]

DATASETS_README = "datasets/README.md"
REGISTER_HINT = (
    "To register a COCO-json dataset, add (name, annotation_json, image_root) to "
    "DATASETS.REGISTER_COCO (see README.md); for detectron2's builtin coco_* names, lay out "
    f"COCO as {DATASETS_README} describes."
)


def check_dataset_names(names, config_key):
    """Every dataset name in ``names`` (the value of ``config_key``) must be registered."""
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=5, cutoff=0.5)
            listed = f" Registered names close to it: {', '.join(close)}." if close else ""
            raise SetupError(f"Dataset {name!r} in {config_key} is not registered.{listed} "
                             f"{REGISTER_HINT}")


def _layout_hint(name):
    """Where the files of dataset ``name`` are expected, for messages about missing ones."""
    if name.startswith("coco_"):
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
        return (f"detectron2's builtin COCO datasets are read from $DETECTRON2_DATASETS "
                f"(now {root!r}); see {DATASETS_README}.")
    return "Check the json_file and image_root the dataset was registered with."


def _file_size(path):
    """Size in bytes of a local file; None if it does not exist; -1 for URLs (not checked)."""
    if "://" in path:
        return -1
    try:
        return os.stat(path).st_size if os.path.isfile(path) else None
    except OSError:
        return None


def _listed(paths):
    """The first three of ``paths``, comma-separated, "..." when there are more."""
    return ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")


def _check_image_files(name, dicts):
    """Every local image of the dataset must exist and not be empty (one stat per file)."""
    sizes = [(d["file_name"], _file_size(d["file_name"])) for d in dicts]
    missing = [path for path, size in sizes if size is None]
    image_root = MetadataCatalog.get(name).get("image_root", "its image folder")
    if missing:
        raise SetupError(f"Dataset {name!r}: {len(missing)} of {len(dicts)} image files do not "
                         f"exist: {_listed(missing)}. Images are read from {image_root}. "
                         f"{_layout_hint(name)}")
    empty = [path for path, size in sizes if size == 0]
    if empty:
        raise SetupError(f"Dataset {name!r}: {len(empty)} of {len(dicts)} image files are empty "
                         f"(0 bytes): {_listed(empty)}. Replace them, or remove those images from "
                         "the dataset's annotation file.")


def _check_panoptic_files(name, metadata):
    """A COCO-panoptic set (builtin or DATASETS.REGISTER_COCO_PANOPTIC): its json, PNGs and
    images checked by ``validate_panoptic_dataset`` (DatasetError naming file and id)."""
    if not os.path.isfile(metadata.panoptic_json):
        raise SetupError(f"Dataset {name!r}: panoptic json {metadata.panoptic_json} does not exist. "
                         f"{_layout_hint(name)}")
    validate_panoptic_dataset(name, metadata.panoptic_json, metadata.panoptic_root, metadata.image_root)


def load_dataset_dicts(name):
    """The records (detectron2 dataset dicts) of the registered dataset ``name``.

    A dataset with json_file and image_root metadata must have its annotation file; a
    COCO-json one (evaluator_type "coco", e.g. the builtin coco_* names and
    DATASETS.REGISTER_COCO entries) is first checked by ``validate_coco_dataset``, which
    raises DatasetError for an annotation file that does not parse or has defects (LVIS
    json, whose images have no file_name, is read by detectron2's own loader); a
    COCO-panoptic one (evaluator_type "coco_panoptic_seg") by ``validate_panoptic_dataset``
    (json, PNGs, image files). Raises SetupError if the annotation file is missing, the
    dataset is empty, or one of its image files does not exist or is empty. Each record
    gets "dataset_name" (``name``), which error messages about its image use.
    """
    metadata = MetadataCatalog.get(name)
    if metadata.get("evaluator_type", None) == PANOPTIC_EVALUATOR_TYPE:
        _check_panoptic_files(name, metadata)
    elif metadata.get("json_file", None) and metadata.get("image_root", None):
        if not os.path.isfile(metadata.json_file):
            raise SetupError(f"Dataset {name!r}: annotation file {metadata.json_file} does not "
                             f"exist. {_layout_hint(name)}")
        if metadata.get("evaluator_type", "coco") == "coco":
            validate_coco_dataset(name, metadata.json_file, metadata.image_root)
    dicts = DatasetCatalog.get(name)
    if not dicts:
        raise SetupError(f"Dataset {name!r} has no images.")
    _check_image_files(name, dicts)
    for record in dicts:  # so that an image that fails to read later is named with its dataset
        record.setdefault("dataset_name", name)
    return dicts
