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
"coco_panoptic_seg"  ``COCOPanopticEvaluator`` (PQ, SQ, RQ for all / things / stuff, with
               panopticapi's ``pq_compute``): detectron2's builtin ``coco_*_panoptic``
               sets and DATASETS.REGISTER_COCO_PANOPTIC entries; the model must output
               ``panoptic_seg`` (MODEL.MASK_ON and MODEL.DETR.PANOPTIC_ON)
=============  ==================================================================

Any other type (or none) is a ``SetupError`` naming the dataset, its type and these.
"""
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
)

from detr_d2 import compat
from detr_d2.checkpoint.class_names import fill_missing_class_names
from detr_d2.errors import SetupError
from detr_d2.evaluation.fast_coco_eval import FasterCOCOeval

__all__ = ["EVALUATOR_TYPES", "check_evaluator_types", "detection_evaluator"]

EVALUATOR_TYPES = ("coco", "lvis", "pascal_voc", "coco_panoptic_seg")


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


def _check_panoptic_output(cfg, dataset_name):
    """A panoptic test set needs the model's ``panoptic_seg`` (SetupError naming the keys)."""
    if not (cfg.MODEL.MASK_ON and cfg.MODEL.DETR.get("PANOPTIC_ON", False)):
        raise SetupError(
            f"Dataset {dataset_name!r} in DATASETS.TEST is a panoptic set (evaluator_type "
            "'coco_panoptic_seg', evaluated by PQ), which needs MODEL.MASK_ON True and "
            "MODEL.DETR.PANOPTIC_ON True (the configs/*panoptic*.yaml set both); set them, or "
            "remove the set from DATASETS.TEST (e.g. DATASETS.TEST '()' for a box-only stage).")


def check_evaluator_types(dataset_names, config_key="DATASETS.TEST", cfg=None):
    """Every dataset of ``dataset_names`` has a supported ``evaluator_type`` (SetupError if
    not); with ``cfg``, a panoptic one also needs the model's panoptic output."""
    for name in dataset_names:
        if evaluator_type(name, config_key) == "coco_panoptic_seg" and cfg is not None:
            _check_panoptic_output(cfg, name)


def _tasks(cfg):
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


def detection_evaluator(cfg, dataset_name, output_dir):
    """The detectron2 evaluator of ``dataset_name``'s ``evaluator_type`` (see the module doc);
    COCO, LVIS and COCO-panoptic write their predictions into ``output_dir``. A set that names
    no classes gets those written beside MODEL.WEIGHTS (``fill_missing_class_names``)."""
    kind = evaluator_type(dataset_name)
    fill_missing_class_names(cfg, dataset_name)
    if kind == "coco_panoptic_seg":
        _check_panoptic_output(cfg, dataset_name)
        return COCOPanopticEvaluator(dataset_name, output_dir=output_dir)
    if kind == "lvis":
        return LVISEvaluator(dataset_name, tasks=_tasks(cfg), output_dir=output_dir)
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    use_fast_impl = cfg.TEST.COCO_EVAL_IMPL == "fast"
    if use_fast_impl:
        compat.fill_in_fast_coco_eval(FasterCOCOeval)
    return COCOEvaluator(dataset_name, tasks=_tasks(cfg), output_dir=output_dir, use_fast_impl=use_fast_impl)
