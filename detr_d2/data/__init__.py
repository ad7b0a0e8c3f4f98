"""DETR's data pipeline in detectron2 form: the dataset mapper and its augmentation."""
from detr_d2.data.dataset_mapper import DetrDatasetMapper, build_detr_augmentation
from detr_d2.data.transforms import RandomApplyList

__all__ = ["DetrDatasetMapper", "RandomApplyList", "build_detr_augmentation"]
