"""DETR's optimizer: AdamW (or SGD), a lower backbone LR, optional gradient clipping.

Parameter groups (the reference DETR's): every trainable parameter whose name starts with
"backbone." gets ``SOLVER.BASE_LR * SOLVER.BACKBONE_MULTIPLIER``, the others
``SOLVER.BASE_LR``; all get ``SOLVER.WEIGHT_DECAY``. Frozen parameters
(``requires_grad=False``, e.g. the ResNet stem and res2) are left out.

Clipping (``SOLVER.CLIP_GRADIENTS``, when ENABLED), applied at each ``step()`` before the
update:
- CLIP_TYPE "full_model": the gradients of all parameters together are scaled so that
  their joint norm (``NORM_TYPE``) is at most ``CLIP_VALUE`` (the reference's
  ``clip_max_norm``);
- "value" / "norm": detectron2's per-parameter clipping (``maybe_add_gradient_clipping``).
"""
import torch
from detectron2.solver.build import maybe_add_gradient_clipping

from detr_d2.engine.checks import SetupError

__all__ = ["build_detr_optimizer", "detr_param_groups"]

BACKBONE_PREFIX = "backbone."
FULL_MODEL = "full_model"
DETECTRON2_CLIP_TYPES = ("value", "norm")


def detr_param_groups(model, base_lr, backbone_multiplier):
    """Two parameter groups of the trainable parameters of ``model``.

    Returns:
        list[dict]: ``{"params", "lr"}`` for the non-backbone parameters (lr ``base_lr``)
        and for the "backbone." ones (lr ``base_lr * backbone_multiplier``); a group with
        no parameters is omitted.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    backbone = [p for name, p in trainable if name.startswith(BACKBONE_PREFIX)]
    others = [p for name, p in trainable if not name.startswith(BACKBONE_PREFIX)]
    groups = [{"params": others, "lr": base_lr},
              {"params": backbone, "lr": base_lr * backbone_multiplier}]
    return [group for group in groups if group["params"]]


def _with_full_model_clipping(optimizer_cls, max_norm, norm_type):
    """A subclass of ``optimizer_cls`` whose ``step`` first clips the joint gradient norm."""

    class FullModelClipped(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipped.__name__ = f"{optimizer_cls.__name__}WithFullModelGradientClip"
    FullModelClipped.__qualname__ = FullModelClipped.__name__
    return FullModelClipped


def _optimizer_class(cfg):
    """The torch optimizer class of SOLVER.OPTIMIZER, wrapped for SOLVER.CLIP_GRADIENTS."""
    classes = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in classes:
        raise SetupError(f"SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r} is not supported; "
                         f"use one of {', '.join(classes)}.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return classes[name]
    if clip.CLIP_TYPE == FULL_MODEL:
        return _with_full_model_clipping(classes[name], clip.CLIP_VALUE, clip.NORM_TYPE)
    if clip.CLIP_TYPE in DETECTRON2_CLIP_TYPES:
        return maybe_add_gradient_clipping(cfg, classes[name])
    raise SetupError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip.CLIP_TYPE!r} is not supported; "
                     f"use one of {', '.join((FULL_MODEL,) + DETECTRON2_CLIP_TYPES)}.")


def build_detr_optimizer(cfg, model):
    """The optimizer of ``cfg.SOLVER`` over ``model``'s trainable parameters (see module doc).

    ``model`` is the bare model (not wrapped in DistributedDataParallel), so that its
    parameter names start with "backbone." where they belong to the backbone.
    """
    solver = cfg.SOLVER
    groups = detr_param_groups(model, solver.BASE_LR, solver.BACKBONE_MULTIPLIER)
    optimizer_cls = _optimizer_class(cfg)
    if issubclass(optimizer_cls, torch.optim.SGD):
        return optimizer_cls(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM,
                             nesterov=solver.NESTEROV, weight_decay=solver.WEIGHT_DECAY)
    return optimizer_cls(groups, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY)
