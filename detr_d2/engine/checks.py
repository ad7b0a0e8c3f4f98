"""Checks that turn mistakes in a config or a dataset into one clear message.

Each check runs before the heavy work (model building, weight loading, training) and
raises ``SetupError`` naming the culprit (a config key, a dataset name, a file) and the
fix. ``tools/train_net.py`` prints that message without a traceback and exits non-zero.
"""
import difflib
import math
import os
import re
import tempfile

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from detr_d2.data import validate_coco_dataset

__all__ = [
    "SetupError",
    "merge_config",
    "check_model_config",
    "check_output_dir",
    "check_device",
    "check_amp",
    "check_weights_file",
    "check_weights_to_load",
    "check_dataset_names",
    "load_dataset_dicts",
]

DATASETS_README = "datasets/README.md"
REGISTER_HINT = (
    "To register a COCO-json dataset, add (name, annotation_json, image_root) to "
    "DATASETS.REGISTER_COCO (see README.md); for detectron2's builtin coco_* names, lay out "
    f"COCO as {DATASETS_README} describes."
)


class SetupError(Exception):
    """A problem with the user's config, data or files; the message says what to fix."""


# ---------------------------------------------------------------- config keys
def _all_keys(node, prefix=""):
    """Every dotted key of a CfgNode, inner nodes included (e.g. "SOLVER", "SOLVER.AMP")."""
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, f"{prefix}{key}.")


def _leaf_keys(data, prefix=""):
    """Dotted keys of the leaves of a nested dict loaded from a yaml config."""
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _is_known(cfg, dotted_key):
    """True if ``dotted_key`` exists in ``cfg`` or lies under a node that accepts new keys."""
    node = cfg
    for part in dotted_key.split("."):
        if not isinstance(node, CfgNode):
            return False
        if part not in node:
            return node.is_new_allowed()
        node = node[part]
    return True


def _unknown_key_message(key, cfg, source):
    keys = list(_all_keys(cfg))
    close = (difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.6))
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"Unknown config key {key} in {source}.{hint}"


def _raise_on_unknown_keys(cfg, keys, source):
    unknown = [key for key in keys if not _is_known(cfg, key)]
    if unknown:
        lines = [_unknown_key_message(key, cfg, source) for key in unknown]
        lines.append("Valid keys are detectron2's defaults plus those of "
                     "detr_d2.add_detr_config; fix the spelling or remove the key.")
        raise SetupError("\n".join(lines))


def _load_config_file(config_file):
    """The config file as a nested dict, its ``_BASE_`` files merged in."""
    try:
        return CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
    except OSError as e:
        raise SetupError(f"Cannot read config file {config_file} (or a _BASE_ file it names): "
                         f"{e}") from e
    except yaml.YAMLError as e:
        raise SetupError(f"Config file {config_file} (or a _BASE_ file it names) is not valid "
                         f"YAML: {e}") from e


_TYPE_MISMATCH = re.compile(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values "
                            r"\((.*) vs\. (.*)\) for config key: (\S+)", re.DOTALL)
_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "True or False", "str": "a string",
               "tuple": "a tuple, e.g. (1, 2)", "list": "a list, e.g. [1, 2]"}


def _type_mismatch_message(error, source):
    """yacs' "Type mismatch" complaint as: key, value given, type expected, example; or None."""
    match = _TYPE_MISMATCH.search(str(error))
    if not match:
        return None
    expected, given, default, value, key = match.groups()
    return (f"{key} must be {_TYPE_WORDS.get(expected, 'of type ' + expected)} but {source} gives "
            f"{value} ({_TYPE_WORDS.get(given, given)}); write it like its default, e.g. {key} {default}.")


def _merge(merge_fn, source):
    """Run a CfgNode merge, reporting yacs' own complaints (e.g. a type mismatch) by source."""
    try:
        merge_fn()
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SetupError(_type_mismatch_message(e, source) or f"Cannot apply {source}: {e}") from e


def merge_config(cfg, config_file, opts):
    """Merge ``config_file`` and then the ``KEY VALUE`` list ``opts`` into ``cfg`` in place.

    Every key is checked to exist in ``cfg`` first; an unknown key is reported with the
    closest existing ones.
    """
    if config_file:
        loaded = _load_config_file(config_file)
        if loaded.get("VERSION", cfg.VERSION) == cfg.VERSION:  # older versions get renamed keys
            _raise_on_unknown_keys(cfg, _leaf_keys(loaded), f"config file {config_file}")
        _merge(lambda: cfg.merge_from_file(config_file), f"config file {config_file}")
    if opts:
        if len(opts) % 2:
            raise SetupError(f"Command-line overrides come in KEY VALUE pairs; got an odd "
                             f"number of words: {' '.join(opts)}")
        _raise_on_unknown_keys(cfg, opts[0::2], "the command line")
        _merge(lambda: cfg.merge_from_list(opts), "the command line")
    return cfg


# ---------------------------------------------------------------- values
def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition, key, value, rule, fix):
    if not condition:
        raise SetupError(f"{key} is {value!r} but must be {rule}; {fix}")


def check_model_config(cfg):
    """Values of MODEL.DETR and SOLVER that would fail deep inside model building or training.

    NUM_CLASSES unset or a positive integer; HIDDEN_DIM divisible by NHEADS (and by 4 for
    sine position embeddings); positive layer, query and batch sizes; DROPOUT in [0, 1);
    a non-negative, finite BASE_LR.
    """
    detr, solver = cfg.MODEL.DETR, cfg.SOLVER
    num_classes = detr.NUM_CLASSES
    _require(num_classes is None or (_is_int(num_classes) and num_classes >= 1),
             "MODEL.DETR.NUM_CLASSES", num_classes, "a positive integer (object classes, without the "
             "no-object class)", "remove the key to take the count from DATASETS.TRAIN, or fix it")
    for key in ("HIDDEN_DIM", "NHEADS", "NUM_OBJECT_QUERIES", "DIM_FEEDFORWARD", "DEC_LAYERS"):
        _require(_is_int(detr[key]) and detr[key] >= 1, f"MODEL.DETR.{key}", detr[key],
                 "a positive integer", "fix the value")
    _require(_is_int(detr.ENC_LAYERS) and detr.ENC_LAYERS >= 0, "MODEL.DETR.ENC_LAYERS",
             detr.ENC_LAYERS, "an integer >= 0", "fix the value")
    _require(detr.HIDDEN_DIM % detr.NHEADS == 0, "MODEL.DETR.HIDDEN_DIM", detr.HIDDEN_DIM,
             f"divisible by MODEL.DETR.NHEADS ({detr.NHEADS}): each attention head gets "
             "HIDDEN_DIM / NHEADS channels",
             f"e.g. MODEL.DETR.HIDDEN_DIM {max(detr.HIDDEN_DIM // detr.NHEADS, 1) * detr.NHEADS}")
    multiple = 4 if detr.POSITION_EMBEDDING == "sine" else 2  # y/x halves; sin/cos pairs
    _require(detr.HIDDEN_DIM % multiple == 0, "MODEL.DETR.HIDDEN_DIM", detr.HIDDEN_DIM,
             f"a multiple of {multiple} with MODEL.DETR.POSITION_EMBEDDING {detr.POSITION_EMBEDDING!r} "
             "(the position features are split between y and x)", "fix the value")
    _require(0.0 <= detr.DROPOUT < 1.0, "MODEL.DETR.DROPOUT", detr.DROPOUT, "in [0, 1)", "fix the value")
    _require(math.isfinite(solver.BASE_LR) and solver.BASE_LR >= 0, "SOLVER.BASE_LR", solver.BASE_LR,
             "a finite number >= 0", "fix the value")
    _require(solver.IMS_PER_BATCH >= 1, "SOLVER.IMS_PER_BATCH", solver.IMS_PER_BATCH,
             "at least 1", "fix the value")


def check_output_dir(cfg):
    """OUTPUT_DIR must be a folder this process can create and write files in."""
    folder = cfg.OUTPUT_DIR
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SetupError(f"OUTPUT_DIR {folder} cannot be written ({e.strerror or e}: "
                         f"{e.filename or folder}); choose another OUTPUT_DIR, e.g. "
                         "`OUTPUT_DIR ./output`.") from e


# ---------------------------------------------------------------- device, AMP, weights
def check_device(cfg):
    """MODEL.DEVICE must name a device this machine has."""
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except RuntimeError as e:
        raise SetupError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is not a torch device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} (detectron2's default) but no "
                         "CUDA device is available; add `MODEL.DEVICE cpu` to the command line.")


def check_amp(cfg):
    """Mixed precision (SOLVER.AMP.ENABLED) is refused unless training runs on CUDA.

    detectron2's AMPTrainer is built on ``torch.cuda.amp``; rather than silently training
    in float32 while the saved config says AMP, the run stops and says how to proceed.
    """
    if cfg.SOLVER.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type != "cuda":
        raise SetupError(f"SOLVER.AMP.ENABLED is True but MODEL.DEVICE is {cfg.MODEL.DEVICE!r}: "
                         "detectron2's mixed-precision training (AMPTrainer) needs CUDA. Add "
                         "`SOLVER.AMP.ENABLED False` to train in float32 on this device.")


def check_weights_file(path):
    """A local MODEL.WEIGHTS file must exist (URLs such as detectron2:// are not checked)."""
    if path and "://" not in path and not os.path.isfile(path):
        raise SetupError(f"MODEL.WEIGHTS {path} does not exist; give the path of a checkpoint "
                         "(.pth/.pkl) or leave MODEL.WEIGHTS empty to start from scratch.")


def check_weights_to_load(cfg, resume):
    """The file that ``resume_or_load(resume)`` will read must exist.

    With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, that is the checkpoint it
    names; otherwise MODEL.WEIGHTS.
    """
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if not (resume and os.path.isfile(last)):
        check_weights_file(cfg.MODEL.WEIGHTS)
        return
    with open(last) as f:
        checkpoint = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
    if not os.path.isfile(checkpoint):
        raise SetupError(f"--resume: {last} names {checkpoint}, which does not exist; delete "
                         f"{last} (or point it at an existing checkpoint) to resume from there.")


# ---------------------------------------------------------------- datasets
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


def load_dataset_dicts(name):
    """The records (detectron2 dataset dicts) of the registered dataset ``name``.

    A COCO-json dataset (one with json_file and image_root metadata, e.g. the builtin
    coco_* names and DATASETS.REGISTER_COCO entries) is first checked by
    ``validate_coco_dataset``, which raises DatasetError for an annotation file that does
    not parse or has defects. Raises SetupError if the annotation file is missing, the
    dataset is empty, or one of its image files does not exist or is empty. Each record
    gets "dataset_name" (``name``), which error messages about its image use.
    """
    metadata = MetadataCatalog.get(name)
    if metadata.get("json_file", None) and metadata.get("image_root", None):
        if not os.path.isfile(metadata.json_file):
            raise SetupError(f"Dataset {name!r}: annotation file {metadata.json_file} does not "
                             f"exist. {_layout_hint(name)}")
        validate_coco_dataset(name, metadata.json_file, metadata.image_root)
    dicts = DatasetCatalog.get(name)
    if not dicts:
        raise SetupError(f"Dataset {name!r} has no images.")
    _check_image_files(name, dicts)
    for record in dicts:  # so that an image that fails to read later is named with its dataset
        record.setdefault("dataset_name", name)
    return dicts
