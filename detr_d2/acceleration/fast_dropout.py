"""Dropout whose masks come from 16-bit slices of random 64-bit integers (CPU training).

torch's CPU dropout draws one random number per element (``bernoulli_``, single-threaded):
in DETR-R50 training that is about 7 % of an iteration. Here each random 64-bit integer
gives four 16-bit slices, and an element is dropped when its slice falls below a threshold:
the drop probability becomes ``round(p * 65536) / 65536`` (0.1 -> 0.1000061) and kept
elements are scaled by the inverse of the quantised keep probability, so the expected
output still equals the input. Same seed, same masks; a different random stream from
``torch.nn.functional.dropout``, hence training-only and switchable
(``detr_d2.acceleration.set_fast_paths``).
On other devices (CUDA's fused dropout is already fast) ``F.dropout`` runs unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn

_SLICE_VALUES = 1 << 16
_SLICES_PER_WORD = 4


def quantised_drop_probability(p):
    """The drop probability the 16-bit masks realise for a requested ``p``."""
    return round(p * _SLICE_VALUES) / _SLICE_VALUES


def keep_mask(shape, p, device):
    """Bool tensor of ``shape``: True (kept) with probability 1 - quantised_drop_probability(p)."""
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + _SLICES_PER_WORD - 1) // _SLICES_PER_WORD, dtype=torch.int64, device=device)
    slices = words.random_(-(1 << 63), None).view(torch.int16)[:count]
    threshold = round(p * _SLICE_VALUES) - _SLICE_VALUES // 2
    return (slices >= threshold).view(shape)


def _masked_scale(x, keep, scale):
    """x where keep else 0, times scale (one masked pass and one in-place scaling)."""
    return torch.where(keep, x, x.new_zeros(())).mul_(scale)


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the bool mask for backward."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _masked_scale(grad, keep, ctx.scale), None, None


def fast_dropout(x, p):
    """Dropout of ``x`` (any shape) with drop probability ``p`` on 16-bit masks (training)."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    scale = 1.0 / (1.0 - quantised_drop_probability(p))
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), scale)


def uses_fast_masks(module, x):
    """Whether ``module`` (with ``fast_masks`` and ``training``) should use ``fast_dropout`` on ``x``."""
    return module.fast_masks and module.training and x.device.type == "cpu"


class FastMaskDropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) that uses ``fast_dropout`` in CPU training
    while ``fast_masks`` is True."""

    fast_masks = True

    def forward(self, x):
        if uses_fast_masks(self, x) and not self.inplace:
            return fast_dropout(x, self.p)
        return F.dropout(x, self.p, self.training, self.inplace)

