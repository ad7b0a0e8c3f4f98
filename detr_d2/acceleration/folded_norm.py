"""Convolutions with their frozen batch norm folded in, computed from the current weights.

detectron2's ResNet (and the tiny CNN) apply ``FrozenBatchNorm2d`` after each ``Conv2d``:
``y = (conv(x, W) + b) * s + t`` with ``s = gamma / sqrt(running_var + eps)`` and
``t = beta - running_mean * s``. The same map is one convolution with
``W' = W * s`` (per output channel) and ``b' = b * s + t``, which saves a full pass over
every feature map (and, in training, the multiply and add of ``FrozenBatchNorm2d``'s
autograd path and their saved tensors).

In training the fold is done at every forward, so gradients reach ``W`` through the
product; without autograd (inference, frozen stages) the folded weights are kept and
recomputed only when a tensor they come from changes (checkpoint loading, optimizer
steps), which costs one copy of those weights in memory. The modules keep their
parameters, buffers and names: state dicts and checkpoints are unchanged.

On the CPU, ``FrozenNormConv2d.prepacked_forward`` / ``prepacked_add_`` run the folded
convolution as one oneDNN call on a weight reordered once into oneDNN's blocked layout
(kept in the same cache slot, for one input shape at a time), with the ReLU, or the
residual addition, done by the convolution itself (oneDNN post-ops): see
``prepacked_resnet``. Under autocast, kept folds are stored in autocast's dtype (bfloat16
on the CPU) and prepacked weights in the input's dtype.
"""
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d

__all__ = ["FrozenNormConv2d", "fold_frozen_batchnorm", "folds_every_norm", "set_norm_folding"]


def frozen_norm_scale_and_shift(norm):
    """(s, t), each [C]: ``FrozenBatchNorm2d(x) == x * s[:, None, None] + t[:, None, None]``."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


class FrozenNormConv2d(Conv2d):
    """detectron2 ``Conv2d`` whose ``FrozenBatchNorm2d`` norm is folded into the convolution
    while ``fold_norm`` is True; with ``fold_norm`` False it is detectron2's ``Conv2d``.

    forward(x [B, C_in, H, W]) -> [B, C_out, H', W'] (activation applied, if any). The
    folded weight takes the memory format of ``x`` (channels-last input, channels-last
    weight), so oneDNN needs no layout conversion of the weight.
    """

    fold_norm = True

    @classmethod
    def from_conv(cls, conv):
        """A FrozenNormConv2d holding ``conv``'s own parameters and norm/activation modules."""
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
                     norm=conv.norm, activation=conv.activation)
        folded.weight, folded.bias = conv.weight, conv.bias  # "meta": no memory, no init
        return folded.train(conv.training)

    _folded = None  # (key, (W', b')) of the last fold without autograd

    def __getstate__(self):
        """Copies and pickles leave the kept fold behind (its key names the original's
        tensors, and a prepacked weight is an opaque oneDNN tensor that cannot be copied):
        the copy folds again at its first forward."""
        state = dict(super().__getstate__())
        state.pop("_folded", None)
        return state

    def _fold(self, memory_format):
        scale, shift = frozen_norm_scale_and_shift(self.norm)
        weight = (self.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=memory_format)
        bias = shift if self.bias is None else self.bias * scale + shift
        return weight, bias

    def _fold_key(self, layout):
        """Changes whenever a tensor the fold reads is replaced or modified in place
        (``_version`` counts in-place writes: optimizer steps, ``load_state_dict``), or
        when another ``layout`` of the folded weight is asked for."""
        tensors = (self.weight, self.bias, self.norm.weight, self.norm.bias, self.norm.running_mean,
                   self.norm.running_var)
        return layout, tuple((t.data_ptr(), t._version) for t in tensors if t is not None)

    def folded_weight_and_bias(self, memory_format=torch.contiguous_format, dtype=None):
        """(W' [C_out, C_in/groups, kh, kw] in ``memory_format``, b' [C_out]).

        Recomputed at each call when autograd needs the product (a trainable weight, grad
        enabled); otherwise kept until a tensor it reads changes (inference, frozen stages),
        then with ``dtype`` (e.g. autocast's bfloat16) both kept in that dtype (folded in
        float32, rounded once) so that autocast does not cast them again at every call.
        """
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._fold(memory_format)
        key = self._fold_key((memory_format, dtype))
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                weight, bias = self._fold(memory_format)
                if dtype is not None:
                    weight, bias = weight.to(dtype), bias.to(dtype)
                self._folded = (key, (weight, bias))
        return self._folded[1]

    def prepacked_weight_and_bias(self, input_shape, dtype=torch.float32):
        """(W' reordered by oneDNN for inputs of ``input_shape`` (B, C_in, H, W): an opaque
        mkldnn tensor, b' [C_out]), both in ``dtype`` (float32, or bfloat16 for bfloat16
        inputs; oneDNN's in-place sum wants the bias in the input's dtype), without autograd.
        The fold is computed in float32 and rounded once.

        oneDNN picks the blocked weight layout from the input shape too (a weight packed for
        another shape is reordered again at every call: 1.7x slower), so the packed weight
        is kept for the last input shape only, in the cache slot of the folded weight, and
        recomputed when the shape or a tensor it comes from changes (the reorder: ~5 ms per
        million weights on one thread).
        """
        key = self._fold_key(("oneDNN", tuple(input_shape), dtype))
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                weight, bias = self._fold(torch.channels_last)
                weight = torch.ops.mkldnn._reorder_convolution_weight(
                    weight.to(dtype), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    list(input_shape))
                self._folded = (key, (weight, bias.to(dtype)))
        return self._folded[1]

    def prepacked_forward(self, x, relu=False):
        """One oneDNN convolution with the folded, prepacked weight, ReLU fused if ``relu``.

        x [B, C_in, H, W] float32 or bfloat16, channels-last on the CPU -> ``conv'(x)`` (then
        ReLU), [B, C_out, H', W'] channels-last in x's dtype. Ignores ``self.activation``; no
        autograd.
        """
        weight, bias = self.prepacked_weight_and_bias(x.shape, x.dtype)
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "relu" if relu else "none", [], "")

    def prepacked_add_(self, x, accumulator, relu=False):
        """``accumulator += conv'(x)`` (then ReLU if ``relu``) in one oneDNN convolution (sum
        and ReLU post-ops), in place.

        x [B, C_in, H, W] float32 or bfloat16, channels-last on the CPU, accumulator
        [B, C_out, H', W'] channels-last of x's dtype -> accumulator. Writing into a tensor whose pages are already mapped
        (a residual) instead of a new one saves the page faults of a fresh allocation:
        half the time of the 256-channel res2 convolutions. No autograd.
        """
        weight, bias = self.prepacked_weight_and_bias(x.shape, x.dtype)
        return torch.ops.mkldnn._convolution_pointwise_(
            accumulator, x, weight, bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "add", 1.0, "relu" if relu else None, [], "")

    def _is_strided_pointwise(self):
        return self.kernel_size == (1, 1) and self.padding == (0, 0) and self.stride != (1, 1)

    def forward(self, x):
        if not self.fold_norm:
            return super().forward(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        autocast_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        weight, bias = self.folded_weight_and_bias(torch.channels_last if channels_last else torch.contiguous_format,
                                                   autocast_dtype)
        stride = self.stride
        if self._is_strided_pointwise() and torch.is_grad_enabled() and x.device.type == "cpu":
            # the same products: a strided 1x1 conv reads only every stride-th pixel. torch's
            # CPU backward of strided convs copies the whole input first (R50's res4/res5
            # shortcuts: 104 -> 78 and 127 -> 80 ms forward + backward).
            x, stride = x[:, :, ::stride[0], ::stride[1]], (1, 1)
        x = F.conv2d(x, weight, bias, stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)


def _is_foldable(module):
    return type(module) is Conv2d and isinstance(module.norm, FrozenBatchNorm2d)


def fold_frozen_batchnorm(module):
    """Replace, in place, every detectron2 ``Conv2d`` of ``module`` (exactly that class)
    whose norm is a ``FrozenBatchNorm2d`` by a ``FrozenNormConv2d`` sharing its parameters;
    returns ``module``. Parameter and buffer names are unchanged."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_foldable(child):
                setattr(parent, name, FrozenNormConv2d.from_conv(child))
    return module


def set_norm_folding(module, enabled):
    """Turn the folding of every ``FrozenNormConv2d`` in ``module`` on or off."""
    for child in module.modules():
        if isinstance(child, FrozenNormConv2d):
            child.fold_norm = enabled


def folds_every_norm(module):
    """Whether every conv of ``module`` that has a norm has one it folds (FrozenBatchNorm2d).

    The channels-last layout pays where the convolutions are all that touch the feature
    maps; GroupNorm's channels-last CPU kernels are slower (measured: the GN ResNet-18 of
    configs/tests/tiny.yaml ran 1.2x slower in eval, 1.9x in training).
    """
    return all(isinstance(child, FrozenNormConv2d) or getattr(child, "norm", None) is None
               for child in module.modules() if isinstance(child, Conv2d))
