"""What every tool does first: logging, class names; and its exit statuses (the argument
types, ``fraction`` ... ``input_size``, are ``tool_arguments``'s, importable from here too).

The tools build their config with ``detr_d2.engine.build_config(config_file, opts,
all_datasets_registered=False)``. Exit statuses of the tools: 0 success, 1 some input
could not be processed (the others were), 2 a setup problem (a ``SetupError``: config,
weights, dataset, arguments) reported in one line without a traceback.
"""
import logging
import os
import sys

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from detr_d2.checkpoint.class_names import metadata_beside_weights
from detr_d2.errors import SetupError
from detr_d2.utils.tool_arguments import fraction, input_size, positive_float, positive_int  # noqa: F401  (argument types)

__all__ = ["EXIT_INPUT_FAILED", "EXIT_SETUP_ERROR", "check_class_count", "fraction", "input_size",
           "make_output_folder", "metadata_with_class_names", "positive_float", "positive_int", "run_tool",
           "setup_tool_logging"]

EXIT_INPUT_FAILED = 1
EXIT_SETUP_ERROR = 2
NO_DATASET = "__detr_d2_no_dataset__"

logger = logging.getLogger("detectron2")


def setup_tool_logging():
    """detectron2's console logging for detectron2, fvcore (checkpoints) and detr_d2."""
    setup_logger(name="fvcore")
    setup_logger(name="detr_d2")
    return setup_logger()


def run_tool(main, argv=None):
    """``main(argv)``'s exit status; a SetupError (any kind) is printed as one ``ERROR:``
    line on stderr and gives EXIT_SETUP_ERROR."""
    try:
        return main(argv)
    except SetupError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return EXIT_SETUP_ERROR


def _has_class_names(name):
    """Whether dataset ``name`` has ``thing_classes``, loading its records once if needed
    (detectron2's COCO loader sets the names and the category-id mapping)."""
    if name not in DatasetCatalog.list():
        logger.warning(f"Dataset {name!r} of the config is not registered; no class names from it")
        return False
    metadata = MetadataCatalog.get(name)
    if not metadata.get("thing_classes"):
        try:
            DatasetCatalog.get(name)
        except (OSError, ValueError, KeyError) as error:
            logger.warning(f"Cannot load dataset {name!r} for its class names: {error}")
            return False
    return bool(metadata.get("thing_classes"))


def metadata_with_class_names(cfg):
    """The Metadata of the first dataset of DATASETS.TRAIN, then DATASETS.TEST, that has
    class names (``thing_classes``, and ``thing_dataset_id_to_contiguous_id`` for COCO
    json); else the class names written beside MODEL.WEIGHTS by
    tools/convert_detr_checkpoint.py; without any, metadata with no names (drawings then
    show class indices)."""
    names = [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
    for name in names:
        if _has_class_names(name):
            return MetadataCatalog.get(name)
    beside_weights = metadata_beside_weights(cfg.MODEL.WEIGHTS, cfg.MODEL.DETR.NUM_CLASSES)
    if beside_weights is not None:
        return beside_weights
    logger.warning("No dataset of the config has class names; labels show class indices")
    return MetadataCatalog.get(NO_DATASET)


def check_class_count(metadata, num_classes):
    """The model's class count must match the metadata's class names (when there are any)."""
    names = metadata.get("thing_classes")
    if names and len(names) != num_classes:
        raise SetupError(f"The model predicts {num_classes} classes but dataset {metadata.name!r} "
                         f"names {len(names)}; put the model's training set first in DATASETS.TRAIN")


def make_output_folder(path):
    """Create the folder ``path`` (and its parents) if needed; SetupError if impossible."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise SetupError(f"Cannot create the output folder {path}: {error}") from error
    return path
