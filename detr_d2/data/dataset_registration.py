"""The datasets a config registers: DATASETS.REGISTER_COCO (``coco_registration``) and
DATASETS.REGISTER_COCO_PANOPTIC (``coco_panoptic``)."""
from detr_d2.data.coco_panoptic import register_panoptic_datasets_from_config
from detr_d2.data.coco_registration import register_coco_datasets_from_config

__all__ = ["register_datasets_from_config"]


def register_datasets_from_config(cfg):
    """Register every DATASETS.REGISTER_COCO and DATASETS.REGISTER_COCO_PANOPTIC entry; makes
    the entry paths absolute in ``cfg`` (call before ``cfg.freeze()``). Returns the resolved
    entries of both keys."""
    return register_coco_datasets_from_config(cfg) + register_panoptic_datasets_from_config(cfg)
