"""COCO evaluation in C++ (faster-coco-eval) behind pycocotools' ``COCOeval`` interface.

detectron2's ``COCOEvaluator(use_fast_impl=True)`` runs ``COCOeval_opt``, whose per-image
matching and accumulation are in detectron2's compiled extension. detectron2 v0.6 from
PyPI has no compiled extension, so there the fast path needs a stand-in: ``FasterCOCOeval``
takes the same arguments as pycocotools' ``COCOeval`` (pycocotools ``COCO`` objects for the
ground truth and the detections, an IoU type) and computes the same ``stats`` and
``eval["precision"]`` / ``eval["recall"]`` arrays with faster-coco-eval, a maintained
C++ re-implementation of COCOeval. ``coco_eval_class`` picks the class of
``TEST.COCO_EVAL_IMPL``.
"""
import faster_coco_eval
from pycocotools.cocoeval import COCOeval

__all__ = ["COCO_EVAL_IMPLS", "FasterCOCOeval", "coco_eval_class"]

COCO_EVAL_IMPLS = ("fast", "official")


def as_faster_coco(coco):
    """faster-coco-eval's ``COCO`` over the same dataset dict as pycocotools' ``coco`` (its
    annotation dicts are shared, not copied); None stays None."""
    if coco is None:
        return None
    return faster_coco_eval.COCO(coco.dataset)


class FasterCOCOeval(faster_coco_eval.COCOeval_faster):
    """faster-coco-eval's COCOeval, built like pycocotools' ``COCOeval(coco_gt, coco_dt, iou_type)``.

    ``coco_gt``, ``coco_dt``: pycocotools ``COCO`` objects (``coco_gt.loadRes(results)`` for
    the detections), boxes XYWH in absolute pixels as in COCO json; ``iou_type`` "bbox",
    "segm" or "keypoints". ``params``, ``evaluate()``, ``accumulate()``, ``summarize()``,
    ``stats`` and ``eval`` behave as pycocotools' do.
    """

    def __init__(self, coco_gt=None, coco_dt=None, iou_type="segm"):
        super().__init__(as_faster_coco(coco_gt), as_faster_coco(coco_dt), iou_type)


def coco_eval_class(impl):
    """The COCOeval class of ``impl``: "official" pycocotools, "fast" ``FasterCOCOeval``."""
    if impl not in COCO_EVAL_IMPLS:
        raise ValueError(f"COCO evaluation implementation {impl!r} is not one of {COCO_EVAL_IMPLS}")
    return COCOeval if impl == "official" else FasterCOCOeval
