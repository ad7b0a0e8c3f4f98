"""DETR's optimizer: AdamW (or SGD), a lower backbone LR, optional gradient clipping.

Parameter groups (the reference DETR's): every trainable parameter whose name starts with
"backbone." gets ``SOLVER.BASE_LR * SOLVER.BACKBONE_MULTIPLIER``, the others
``SOLVER.BASE_LR``; all get ``SOLVER.WEIGHT_DECAY``. The multi-scale DETRs' (Deformable
DETR's, DINO's) sampling-offset and reference-point projections (names containing
"sampling_offsets" or "reference_points") get ``SOLVER.BASE_LR *
MODEL.MULTI_SCALE.LINEAR_PROJ_LR_MULTIPLIER``, as in their references: 0.1 in Deformable
DETR's recipe, 1.0 in DINO's. Frozen parameters
(``requires_grad=False``, e.g. the ResNet stem and res2) are left out.

Clipping (``SOLVER.CLIP_GRADIENTS``, when ENABLED), applied at each ``step()`` before the
update:
- CLIP_TYPE "full_model": the gradients of all parameters together are scaled so that
  their joint norm (``NORM_TYPE``) is at most ``CLIP_VALUE`` (the reference's
  ``clip_max_norm``);
- "value" / "norm": detectron2's per-parameter clipping (``maybe_add_gradient_clipping``).

Implementation (``SOLVER.FUSED_OPTIMIZER``, switchable with ``set_fused_step``): True
updates all parameters in torch's fused kernel (``fused=True``, CPU and CUDA), False in
torch's default per-parameter loop; the updates agree up to float rounding. The choice is
the running config's, also after an optimizer state dict is loaded (torch would take the
saved one). It is set after construction, so torch's AMP GradScaler still unscales the
gradients before ``step`` (and before the clipping), as for the plain loop.
"""
import torch
from detectron2.solver.build import maybe_add_gradient_clipping

from detr_d2.errors import SetupError

__all__ = ["build_detr_optimizer", "detr_param_groups", "set_fused_step"]

BACKBONE_PREFIX = "backbone."
LINEAR_PROJECTION_NAMES = ("sampling_offsets", "reference_points")
FULL_MODEL = "full_model"
DETECTRON2_CLIP_TYPES = ("value", "norm")


def _group_of(name):
    if name.startswith(BACKBONE_PREFIX):
        return "backbone"
    if any(part in name for part in LINEAR_PROJECTION_NAMES):
        return "linear_projection"
    return "others"


def detr_param_groups(model, base_lr, backbone_multiplier, linear_projection_multiplier=1.0):
    """The parameter groups of the trainable parameters of ``model``.

    Returns:
        list[dict]: ``{"params", "lr"}`` for the other parameters (lr ``base_lr``), the
        "backbone." ones (lr ``base_lr * backbone_multiplier``) and the sampling-offset /
        reference-point projections (lr ``base_lr * linear_projection_multiplier``); a
        group with no parameters is omitted.
    """
    lrs = {"others": base_lr, "backbone": base_lr * backbone_multiplier,
           "linear_projection": base_lr * linear_projection_multiplier}
    params = {group: [] for group in lrs}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            params[_group_of(name)].append(parameter)
    return [{"params": params[group], "lr": lr} for group, lr in lrs.items() if params[group]]


def set_fused_step(optimizer, enabled):
    """Make the next ``optimizer.step()`` calls use torch's fused kernel (True) or its plain
    per-parameter loop (False)."""
    for group in optimizer.param_groups:
        group["fused"] = enabled


def _clip_full_model(optimizer, max_norm, norm_type):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)


def _detr_optimizer_class(optimizer_cls, full_model_clip=None):
    """A subclass of ``optimizer_cls`` that keeps its fused choice when a state dict is
    loaded and, given ``full_model_clip`` = (max_norm, norm_type), clips the joint gradient
    norm first at each step."""

    class DetrOptimizer(optimizer_cls):
        def step(self, closure=None):
            if full_model_clip is not None:
                _clip_full_model(self, *full_model_clip)
            return super().step(closure)

        def load_state_dict(self, state_dict):
            fused = [group["fused"] for group in self.param_groups]
            super().load_state_dict(state_dict)
            for group, choice in zip(self.param_groups, fused):
                group["fused"] = choice

    suffix = "WithFullModelGradientClip" if full_model_clip is not None else ""
    DetrOptimizer.__name__ = DetrOptimizer.__qualname__ = optimizer_cls.__name__ + suffix
    return DetrOptimizer


def _optimizer_class(cfg):
    """The torch optimizer class of SOLVER.OPTIMIZER, wrapped for SOLVER.CLIP_GRADIENTS."""
    classes = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in classes:
        raise SetupError(f"SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r} is not supported; "
                         f"use one of {', '.join(classes)}.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return _detr_optimizer_class(classes[name])
    if clip.CLIP_TYPE == FULL_MODEL:
        return _detr_optimizer_class(classes[name], (clip.CLIP_VALUE, clip.NORM_TYPE))
    if clip.CLIP_TYPE in DETECTRON2_CLIP_TYPES:  # outermost: its step calls super(type(self), ...)
        return maybe_add_gradient_clipping(cfg, _detr_optimizer_class(classes[name]))
    raise SetupError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip.CLIP_TYPE!r} is not supported; "
                     f"use one of {', '.join((FULL_MODEL,) + DETECTRON2_CLIP_TYPES)}.")


def build_detr_optimizer(cfg, model):
    """The optimizer of ``cfg.SOLVER`` over ``model``'s trainable parameters (see module doc).

    ``model`` is the bare model (not wrapped in DistributedDataParallel), so that its
    parameter names start with "backbone." where they belong to the backbone.
    """
    solver = cfg.SOLVER
    groups = detr_param_groups(model, solver.BASE_LR, solver.BACKBONE_MULTIPLIER,
                               cfg.MODEL.MULTI_SCALE.LINEAR_PROJ_LR_MULTIPLIER)
    optimizer_cls = _optimizer_class(cfg)
    if issubclass(optimizer_cls, torch.optim.SGD):
        optimizer = optimizer_cls(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM,
                                  nesterov=solver.NESTEROV, weight_decay=solver.WEIGHT_DECAY)
    else:
        optimizer = optimizer_cls(groups, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY)
    set_fused_step(optimizer, solver.FUSED_OPTIMIZER)
    return optimizer
