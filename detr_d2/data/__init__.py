"""DETR's data pipeline in detectron2 form: dataset mapper, augmentation, COCO-json
datasets registered from the config and checked before training, batch packing."""
from detr_d2.data.batch_packing import pack_batch
from detr_d2.data.coco_registration import DatasetError, register_datasets_from_config, resolve_num_classes
from detr_d2.data.coco_validation import validate_coco_dataset
from detr_d2.data.dataset_mapper import DetrDatasetMapper, build_detr_augmentation
from detr_d2.data.transforms import RandomApplyList

__all__ = ["DatasetError", "DetrDatasetMapper", "RandomApplyList", "build_detr_augmentation",
           "pack_batch", "register_datasets_from_config", "resolve_num_classes",
           "validate_coco_dataset"]
