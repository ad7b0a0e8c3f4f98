"""Evaluation of DETR on test sets: the evaluator of each dataset's ``evaluator_type``,
DETR's criterion on the test set (validation losses), and a fast COCOeval.

Modules: ``evaluators`` (evaluator by type), ``validation_losses`` (criterion averaged over
a test set in the same pass as the detections), ``fast_coco_eval`` (faster-coco-eval behind
pycocotools' COCOeval interface), ``panoptic_thresholds`` (PQ at several panoptic
thresholds from one pass), ``synthetic_coco`` and ``coco_eval_benchmark`` (generated
COCO-sized data; official vs fast timing).
"""
from detr_d2.evaluation.evaluators import EVALUATOR_TYPES, check_evaluator_types, detection_evaluator
from detr_d2.evaluation.fast_coco_eval import COCO_EVAL_IMPLS, FasterCOCOeval, coco_eval_class
from detr_d2.evaluation.panoptic_thresholds import PanopticAtThresholds, pq_at_thresholds
from detr_d2.evaluation.validation_losses import ValidationLossEvaluator, WithValidationLosses

__all__ = ["COCO_EVAL_IMPLS", "EVALUATOR_TYPES", "FasterCOCOeval", "PanopticAtThresholds", "ValidationLossEvaluator",
           "WithValidationLosses", "check_evaluator_types", "coco_eval_class", "detection_evaluator",
           "pq_at_thresholds"]
