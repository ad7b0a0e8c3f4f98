"""``DetrAMPTrainer``: detectron2's AMPTrainer on any device, in bfloat16 or float16.

detectron2's ``AMPTrainer`` (v0.6 and main) asserts CUDA and autocasts with
``torch.cuda.amp``. This subclass keeps its semantics and state (``state_dict()["grad_scaler"]``)
and runs the step under ``torch.autocast`` of the model's device in the dtype chosen by
``engine.precision`` (SOLVER.AMP.PRECISION):

* float16 (CUDA's default; also allowed on the CPU): the loss is scaled by a
  ``torch.amp.GradScaler`` of the device before backward; ``GradScaler.step`` unscales the
  gradients before the optimizer's step (and so before its full-model clipping) and skips
  the step, lowering the scale, when they hold inf/NaN: that is loss scaling at work,
  not a failure;
* bfloat16 (the CPU's default): no scaling (bfloat16 has float32's range); the scaler is a
  disabled ``GradScaler``, whose state is empty.

The loss terms are float32 (the criterion is a float32 island, ``modeling.float32``) and
are checked for NaN/inf before they are written (``finite_checks.FiniteLossCheck``).
Checkpoints: the optimizer state is float32 like the parameters, so AMP and float32 runs
read each other's checkpoints; a checkpoint without grad-scaler state (float32 or bfloat16)
resumed in float16 starts a new scale.
"""
import logging
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from detr_d2.engine.finite_checks import FiniteLossCheck
from detr_d2.engine.precision import autocast, needs_grad_scaler

__all__ = ["DetrAMPTrainer"]

logger = logging.getLogger(__name__)


class DetrAMPTrainer(FiniteLossCheck, AMPTrainer):
    """AMPTrainer that autocasts on ``device`` to ``dtype`` and scales the loss only for
    float16 (see module doc); its non-finite-loss error names the iteration and the terms."""

    def __init__(self, model, data_loader, optimizer, device, dtype):
        device_type = torch.device(device).type
        scaler = torch.amp.GradScaler(device_type, enabled=needs_grad_scaler(dtype))
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler)
        self.device = device
        self.dtype = dtype

    def run_step(self):
        """Forward (model and criterion) under autocast, (scaled) backward, step."""
        assert self.model.training, "[DetrAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with autocast(self.device, self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict):
        """The optimizer state and, for float16, the grad scaler's (a new scale where the
        checkpoint has none: written in float32 or bfloat16)."""
        SimpleTrainer.load_state_dict(self, state_dict)
        saved = state_dict.get("grad_scaler") or {}
        if not self.grad_scaler.is_enabled():
            return
        if saved:
            self.grad_scaler.load_state_dict(saved)
        else:
            logger.info("The checkpoint holds no grad-scaler state (written in float32 or bfloat16): "
                        "float16 loss scaling starts from its initial scale.")
