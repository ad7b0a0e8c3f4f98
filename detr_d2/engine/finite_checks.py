"""Training stops at the first NaN/inf prediction, loss or weight, naming what and when.

detectron2 raises ``FloatingPointError`` when the *sum* of the losses is not finite, but
DETR fails before that: NaN/inf predictions make the Hungarian matcher (scipy) raise
"matrix contains invalid numeric entries". Here training stops (it does not skip the step)
with ``NonFiniteValuesError`` naming the iteration and the loss terms:

* the predictions fed to the criterion are checked (``install_output_check``, a forward
  pre-hook on ``model.criterion`` installed by the Trainer): NaN/inf class logits make
  ``loss_ce`` non-finite, NaN/inf boxes ``loss_bbox`` and ``loss_giou`` (suffix
  ``_<layer>`` for the auxiliary decoder layers, as the logs name them);
* the loss terms themselves are checked before detectron2 writes them
  (``DetrSimpleTrainer``, and ``amp_trainer.DetrAMPTrainer`` under mixed precision: the
  loss terms are float32 there too, so an overflow of the 16-bit forward stops training
  with the same message. A float16 step skipped by the grad scaler because its scaled
  gradients overflowed is normal loss scaling, not an error: training goes on);
* ``AtomicDetectionCheckpointer`` refuses to save NaN/inf weights (``non_finite_tensors``),
  so ``last_checkpoint`` stays the last good one.
"""
import math

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage

from detr_d2.errors import NonFiniteValuesError

__all__ = ["DetrSimpleTrainer", "FiniteLossCheck", "check_finite_losses", "install_output_check",
           "non_finite_tensors"]


def non_finite_tensors(state_dict):
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or inf."""
    return [name for name, value in state_dict.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


def check_finite_losses(loss_dict, iteration):
    """Raise NonFiniteValuesError naming ``iteration`` and each NaN/inf term of ``loss_dict``.

    ``loss_dict``: {name: scalar tensor}, as the model returns it in training.
    """
    values = {name: float(value.detach()) for name, value in loss_dict.items()}
    bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteValuesError(f"iteration {iteration}: non-finite loss terms {', '.join(bad)}")


def _current_iteration():
    """The training iteration of the current EventStorage, "?" outside a training loop."""
    try:
        return get_event_storage().iter
    except AssertionError:  # no EventStorage: not inside a training loop
        return "?"


def _terms_of_non_finite_outputs(logits, boxes, deep_supervision):
    """Loss terms that NaN/inf in ``logits`` [L, B, Q, K+1] / ``boxes`` [L, B, Q, 4] spoil."""
    last = len(logits) - 1
    terms = []
    for layer in range(len(logits)) if deep_supervision else [last]:
        suffix = "" if layer == last else f"_{layer}"
        if not torch.isfinite(logits[layer]).all():
            terms.append(f"loss_ce{suffix}")
        if not torch.isfinite(boxes[layer]).all():
            terms += [f"loss_bbox{suffix}", f"loss_giou{suffix}"]
    return terms


def _check_criterion_inputs(criterion, args):
    """Forward pre-hook of DETR's criterion(logits, boxes, targets): predictions must be finite."""
    logits, boxes = args[0], args[1]
    terms = _terms_of_non_finite_outputs(logits, boxes, getattr(criterion, "deep_supervision", True))
    if terms:
        raise NonFiniteValuesError(
            f"iteration {_current_iteration()}: non-finite loss terms {', '.join(terms)} (the "
            "model's predictions hold NaN/inf, so the matching and the losses cannot be computed)")


def install_output_check(model):
    """Check the predictions ``model.criterion`` receives in training; the hook handle or None.

    ``model`` is the bare model (not DistributedDataParallel); models without a
    ``criterion`` module are left alone.
    """
    criterion = getattr(model, "criterion", None)
    if not isinstance(criterion, torch.nn.Module):
        return None
    return criterion.register_forward_pre_hook(_check_criterion_inputs)


class FiniteLossCheck:
    """Mixin for detectron2's trainers: check the loss terms before they are written."""

    def _write_metrics(self, loss_dict, *args, **kwargs):
        check_finite_losses(loss_dict, self.iter)
        super()._write_metrics(loss_dict, *args, **kwargs)


class DetrSimpleTrainer(FiniteLossCheck, SimpleTrainer):
    """SimpleTrainer whose non-finite-loss error names the iteration and the terms."""
