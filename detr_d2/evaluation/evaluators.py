"""The evaluator of a test set, chosen by the ``evaluator_type`` of its metadata.

As in detectron2's own projects, a dataset says how it is evaluated: its
``MetadataCatalog`` entry has ``evaluator_type``: ``register_coco_instances`` and DATASETS.REGISTER_COCO set "coco",
``register_lvis_instances`` "lvis"; after ``register_pascal_voc`` set it to "pascal_voc"
yourself, as detectron2's builtin voc_* names have it. ``detection_evaluator`` maps it:

=============  ==================================================================
"coco"         ``COCOEvaluator`` (bbox; segm too with MODEL.MASK_ON), COCOeval of
               TEST.COCO_EVAL_IMPL: "fast" (detectron2's compiled COCOeval_opt, or
               faster-coco-eval where that is missing) or "official" (pycocotools)
"lvis"         ``LVISEvaluator`` (the ``lvis`` package's LVISEval)
"pascal_voc"   ``PascalVOCDetectionEvaluator`` (VOC AP at IoU 0.5:0.95, AP50, AP75)
=============  ==================================================================

Any other type (or none) is a ``SetupError`` naming the dataset, its type and these.
"""
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator

from detr_d2 import compat
from detr_d2.errors import SetupError
from detr_d2.evaluation.fast_coco_eval import FasterCOCOeval

__all__ = ["EVALUATOR_TYPES", "check_evaluator_types", "detection_evaluator"]

EVALUATOR_TYPES = ("coco", "lvis", "pascal_voc")


def evaluator_type(dataset_name, config_key="DATASETS.TEST"):
    """The supported ``evaluator_type`` of the registered dataset ``dataset_name``.

    Raises:
        SetupError: no type, or one detr_d2 does not evaluate.
    """
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if kind not in EVALUATOR_TYPES:
        described = "has no evaluator_type" if kind is None else f"has evaluator_type {kind!r}"
        raise SetupError(
            f"Dataset {dataset_name!r} in {config_key} {described} in its metadata; detr_d2 evaluates "
            f"the types {', '.join(map(repr, EVALUATOR_TYPES))}. Register the dataset with detectron2's "
            "register_coco_instances or register_lvis_instances (or DATASETS.REGISTER_COCO), or set "
            f"MetadataCatalog.get({dataset_name!r}).evaluator_type to one of them (e.g. 'pascal_voc' "
            f"after register_pascal_voc), or remove it from {config_key}.")
    return kind


def check_evaluator_types(dataset_names, config_key="DATASETS.TEST"):
    """Every dataset of ``dataset_names`` has a supported ``evaluator_type`` (SetupError if not)."""
    for name in dataset_names:
        evaluator_type(name, config_key)


def _tasks(cfg):
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


def detection_evaluator(cfg, dataset_name, output_dir):
    """The detectron2 evaluator of ``dataset_name``'s ``evaluator_type`` (see the module doc);
    COCO and LVIS write their predictions into ``output_dir``."""
    kind = evaluator_type(dataset_name)
    if kind == "lvis":
        return LVISEvaluator(dataset_name, tasks=_tasks(cfg), output_dir=output_dir)
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    use_fast_impl = cfg.TEST.COCO_EVAL_IMPL == "fast"
    if use_fast_impl:
        compat.fill_in_fast_coco_eval(FasterCOCOeval)
    return COCOEvaluator(dataset_name, tasks=_tasks(cfg), output_dir=output_dir, use_fast_impl=use_fast_impl)
