"""PQ of one panoptic model at several PANOPTIC_THRESHOLDs from a single inference pass.

The threshold (the score a query must exceed to make a segment) is the one post-processing
choice of DETR's panoptic output; the reference's 0.85 suits its COCO models, a small model
on other data may want another. Choose it on held-out data, not on the test set.
"""
import torch
from detectron2.evaluation import COCOPanopticEvaluator

from detr_d2.modeling.panoptic import PanopticPostProcess

__all__ = ["PanopticAtThresholds", "pq_at_thresholds"]


class PanopticAtThresholds:
    """A panoptic post-processing (see ``PanopticPostProcess``) giving, for one image,
    {threshold: (seg int32 [H, W], segments_info)} for each of ``thresholds``."""

    def __init__(self, thing_classes, num_classes, thresholds):
        self.post_processes = {t: PanopticPostProcess(thing_classes, num_classes, t) for t in thresholds}

    def __call__(self, logits, mask_logits, image_size, output_size, padded_size=None):
        return {t: post(logits, mask_logits, image_size, output_size, padded_size)
                for t, post in self.post_processes.items()}


def pq_at_thresholds(model, loader, dataset_name, thresholds, output_dir):
    """{threshold: COCOPanopticEvaluator's "panoptic_seg" results (PQ, SQ, RQ, PQ_th, ...)}.

    ``model``: a Detr with PANOPTIC_ON (its own post-processing is replaced for the pass and
    put back); ``loader``: test batches of ``dataset_name``; each threshold's evaluator
    writes to ``output_dir``/threshold_<t>.
    """
    own = model.panoptic
    model.panoptic = PanopticAtThresholds([c for c, thing in enumerate(own.is_thing) if thing],
                                          len(own.is_thing), thresholds)
    evaluators = {t: COCOPanopticEvaluator(dataset_name, f"{output_dir}/threshold_{t}") for t in thresholds}
    for evaluator in evaluators.values():
        evaluator.reset()
    try:
        with torch.no_grad():
            for inputs in loader:
                outputs = model(inputs)
                for t, evaluator in evaluators.items():
                    evaluator.process(inputs, [{"panoptic_seg": out["panoptic_seg"][t]} for out in outputs])
    finally:
        model.panoptic = own
    return {t: evaluator.evaluate()["panoptic_seg"] for t, evaluator in evaluators.items()}
