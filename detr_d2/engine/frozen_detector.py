"""MODEL.DETR.FROZEN_WEIGHTS: the reference's second stage of mask training.

A trained detector checkpoint is loaded into the detection part of a MODEL.MASK_ON model
(every tensor except the mask head's); those parameters are then frozen, so only the mask
head trains. As in the reference, the detector stays in training mode (its dropout is
active); only its gradients are off.
"""
import logging

from detr_d2.engine.checkpointer import AtomicDetectionCheckpointer
from detr_d2.errors import SetupError

__all__ = ["MASK_HEAD_PREFIX", "freeze_detector", "load_frozen_detector"]

logger = logging.getLogger("detectron2")  # the run's log.txt and console
MASK_HEAD_PREFIX = "mask_head."


def freeze_detector(model):
    """Turn off the gradients of every parameter outside the mask head; returns
    (frozen parameter count, trainable parameter count)."""
    frozen = trainable = 0
    for name, parameter in model.named_parameters():
        if name.startswith(MASK_HEAD_PREFIX):
            trainable += parameter.numel() if parameter.requires_grad else 0
        else:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen, trainable


def load_frozen_detector(model, path):
    """Load the detector checkpoint ``path`` into ``model`` (every detection tensor must be
    in it with the model's shape; mask head tensors may be absent) and freeze it."""
    if getattr(model, "mask_head", None) is None:
        raise SetupError(f"MODEL.DETR.FROZEN_WEIGHTS {path}: the model has no mask head to train; "
                         "add MODEL.MASK_ON True")
    checkpointer = AtomicDetectionCheckpointer(model)
    checkpointer.load(path)
    missing = sorted(k for k in checkpointer.incompatible.missing_keys if not k.startswith(MASK_HEAD_PREFIX))
    if missing:
        raise SetupError(f"MODEL.DETR.FROZEN_WEIGHTS {path} lacks {len(missing)} detector tensor(s) of this "
                         f"model (or holds them in another shape): {', '.join(missing[:6])}"
                         f"{' ...' if len(missing) > 6 else ''}; give a checkpoint trained with this config's "
                         "detector (backbone, HIDDEN_DIM, layers, classes)")
    frozen, trainable = freeze_detector(model)
    logger.info(f"MODEL.DETR.FROZEN_WEIGHTS: detector loaded from {path} and frozen (backbone, input_proj, "
                f"transformer, query_embed, class_embed, bbox_embed: {frozen} parameters); training only "
                f"the mask head ({trainable} parameters)")
    return frozen, trainable
