"""DETR's data pipeline in detectron2 form: dataset mapper, augmentation, COCO-json
datasets registered from the config and checked before training, batch packing.

The names below are imported from their modules when first asked for, so that importing
``detr_d2.data.shapes`` (numpy, OpenCV, Pillow) does not import torch and detectron2.
"""
import importlib

_MODULE_OF = {
    "pack_batch": "batch_packing",
    "DatasetError": "coco_registration",
    "register_datasets_from_config": "dataset_registration",
    "resolve_num_classes": "coco_registration",
    "validate_coco_dataset": "coco_validation",
    "DetrDatasetMapper": "dataset_mapper",
    "build_detr_augmentation": "dataset_mapper",
    "RandomApplyList": "transforms",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    """The exported ``name`` from its module (see ``_MODULE_OF``)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'detr_d2.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"detr_d2.data.{_MODULE_OF[name]}"), name)
