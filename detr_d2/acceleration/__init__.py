"""Faster computations of the plain model of ``detr_d2.modeling``, applied by one call.

``accelerate(model)`` swaps modules of a built model for faster equivalents that keep
every parameter, buffer and name (state dicts and checkpoints are unchanged):

* every detectron2 ``Conv2d`` + ``FrozenBatchNorm2d`` becomes a ``FrozenNormConv2d``
  (``folded_norm``): the norm folded into the convolution; in CPU training a strided 1x1
  convolution reads the subsampled input;
* the ``MaskedBackbone`` becomes a ``FastMaskedBackbone`` (``fast_backbone``): in eval the
  body runs channels-last when all its norms fold, and a folded detectron2 ResNet runs
  oneDNN's prepacked, ReLU/residual-fused convolutions on the CPU (``prepacked_resnet``):
  all of it in eval without autograd, its frozen stem and stages in training;
* ``nn.Dropout`` / ``nn.MultiheadAttention`` become ``FastMaskDropout`` /
  ``FastMaskMultiheadAttention``: in CPU training, dropout masks from 16-bit slices of
  random words (``fast_dropout``; drop probability quantised to 1/65536, another random
  stream than torch's).
* every ``MultiScaleDeformableAttention`` (DeformableDetr, Dino) becomes a
  ``FastMultiScaleDeformableAttention``: on the CPU (inference and training) the bilinear
  samples of all levels and points are read by weighted row gathers, one per bilinear
  corner, with the attention weights folded into the corner weights and a backward of
  sparse products (``fast_deformable_attention``), instead of one ``grid_sample`` per level
  and a stack of the samples.

Under CPU autocast to bfloat16 (SOLVER.AMP / TEST.AMP, ``detr_d2.engine.precision``) the
prepacked ResNet convolutions compute in bfloat16 (weights folded in float32, rounded once)
and folded weights that need no gradient are kept in bfloat16, so autocast does not cast
them at every call; everything else is autocast's own choice.

Outputs equal the plain model's up to float rounding (except training's dropout masks).
``set_fast_paths(model, False)`` switches all of it off again for one model, e.g. for
export; MODEL.DETR.FAST_PATHS decides at build time (detectron2's ``build_model``, see
``detr_d2.meta_architectures``).
"""
from torch import nn

from detr_d2.acceleration.fast_backbone import FastMaskedBackbone
from detr_d2.acceleration.fast_deformable_attention import FastMultiScaleDeformableAttention
from detr_d2.acceleration.fast_dropout import FastMaskDropout
from detr_d2.acceleration.fast_mask_attention import FastMaskMultiheadAttention
from detr_d2.acceleration.folded_norm import FrozenNormConv2d, fold_frozen_batchnorm, folds_every_norm
from detr_d2.acceleration.prepacked_resnet import supports_prepacked_forward
from detr_d2.modeling.backbone import MaskedBackbone
from detr_d2.modeling.multi_scale.deformable_attention import MultiScaleDeformableAttention

__all__ = ["accelerate", "fast_paths_enabled", "set_fast_paths"]

# Subclasses that add behaviour but no state: an instance of the key class becomes one of
# the value class in place (same object, same parameters and buffers).
_STATELESS_SWAPS = {
    nn.Dropout: FastMaskDropout,
    nn.MultiheadAttention: FastMaskMultiheadAttention,
    MaskedBackbone: FastMaskedBackbone,
    MultiScaleDeformableAttention: FastMultiScaleDeformableAttention,
}


def _swap_classes(model):
    for module in model.modules():
        faster = _STATELESS_SWAPS.get(type(module))
        if faster is not None:
            module.__class__ = faster


def accelerate(model, enabled=True):
    """Swap ``model``'s modules for their fast equivalents (in place) and switch them on
    (``enabled``) or off; returns ``model``. Calling it again only switches."""
    fold_frozen_batchnorm(model)
    _swap_classes(model)
    return set_fast_paths(model, enabled)


def set_fast_paths(model, enabled):
    """Switch the fast paths of an ``accelerate``d ``model`` on (True) or off (False: the
    plain computation, bit for bit); returns ``model``."""
    for module in model.modules():
        if isinstance(module, FrozenNormConv2d):
            module.fold_norm = enabled
        elif isinstance(module, (FastMaskDropout, FastMaskMultiheadAttention)):
            module.fast_masks = enabled
        elif isinstance(module, FastMultiScaleDeformableAttention):
            module.fast_sampling = enabled
        elif isinstance(module, FastMaskedBackbone):
            module.channels_last = enabled and folds_every_norm(module.body)
            module.prepacked = enabled and supports_prepacked_forward(module.body)
    model.fast_paths = enabled
    return model


def fast_paths_enabled(model):
    """Whether ``set_fast_paths`` last switched ``model``'s fast paths on (False if never)."""
    return getattr(model, "fast_paths", False)
