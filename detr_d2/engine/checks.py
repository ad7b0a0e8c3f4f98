"""Checks that turn mistakes in a config or a dataset into one clear message.

Each check runs before the heavy work (model building, weight loading, training) and
raises ``SetupError`` naming the culprit (a config key, a dataset name, a file) and the
fix. ``tools/train_net.py`` prints that message without a traceback and exits non-zero.
"""
import difflib
import os

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from detr_d2.data import validate_coco_dataset

__all__ = [
    "SetupError",
    "merge_config",
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


def _merge(merge_fn, source):
    """Run a CfgNode merge, reporting yacs' own complaints (e.g. a type mismatch) by source."""
    try:
        merge_fn()
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SetupError(f"Cannot apply {source}: {e}") from e


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
        _merge(lambda: cfg.merge_from_list(opts), "the command-line overrides")
    return cfg


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


def _check_image_files(name, dicts):
    """Every local image of the dataset must exist."""
    missing = [d["file_name"] for d in dicts
               if "://" not in d["file_name"] and not os.path.isfile(d["file_name"])]
    if missing:
        image_root = MetadataCatalog.get(name).get("image_root", "its image folder")
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise SetupError(f"Dataset {name!r}: {len(missing)} of {len(dicts)} image files do not "
                         f"exist: {shown}. Images are read from {image_root}. "
                         f"{_layout_hint(name)}")


def load_dataset_dicts(name):
    """The records (detectron2 dataset dicts) of the registered dataset ``name``.

    A COCO-json dataset (one with json_file and image_root metadata, e.g. the builtin
    coco_* names and DATASETS.REGISTER_COCO entries) is first checked by
    ``validate_coco_dataset``, which raises DatasetError for an annotation file that does
    not parse or has defects. Raises SetupError if the annotation file is missing, the
    dataset is empty, or one of its image files does not exist.
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
    return dicts
