"""Inference forward of a detectron2 ResNet on the CPU through oneDNN's fused convolutions.

detectron2's ``BasicStem``, ``BasicBlock`` and ``BottleneckBlock`` run each convolution,
then ``relu_`` and the residual ``+=`` as separate passes over the feature maps, and
every ``F.conv2d`` reorders its weight into oneDNN's blocked layout again. With every
conv + FrozenBatchNorm folded (``fusion.FrozenNormConv2d``), ``prepacked_resnet_forward``
computes the same blocks from the same modules with one oneDNN call per convolution: the
weight reordered once (cached per input shape, invalidated like the folded weights), the
ReLU applied by the convolution, and the block's last convolution accumulating into its
residual in place (oneDNN post-ops). Activations stay channels-last dense tensors
throughout. Parameters, buffers and state dicts are those of the ResNet; only the forward
differs, and only in eval, without autograd, on the CPU.
"""
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

from detr_d2.modeling.fusion import FrozenNormConv2d

__all__ = ["supports_prepacked_forward", "prepacked_forward_applies", "prepacked_resnet_forward"]


def _block_is_supported(block):
    convs = [getattr(block, name, None) for name in ("conv1", "conv2", "conv3", "shortcut")]
    return type(block) in (BasicStem, BasicBlock, BottleneckBlock) and all(
        conv is None or (isinstance(conv, FrozenNormConv2d) and conv.activation is None
                         and conv.padding_mode == "zeros")
        for conv in convs)


def supports_prepacked_forward(body):
    """Whether ``body`` is a detectron2 ``ResNet`` (no classifier) built from BasicStem,
    BasicBlock and BottleneckBlock only, every conv of which folds its FrozenBatchNorm,
    and this torch has oneDNN."""
    return (torch.backends.mkldnn.is_available() and type(body) is ResNet and body.num_classes is None
            and _block_is_supported(body.stem)
            and all(_block_is_supported(block) for stage in body.stages for block in stage))


def prepacked_forward_applies(body, tensor):
    """Whether ``prepacked_resnet_forward(body, tensor)`` may replace ``body(tensor)``: eval
    mode, no autograd, a float32 CPU tensor, folding switched on."""
    return (not body.training and not torch.is_grad_enabled() and tensor.device.type == "cpu"
            and tensor.dtype == torch.float32 and body.stem.conv1.fold_norm)


def _block_forward(block, x, may_overwrite_input):
    """x [B, C_in, H, W] channels-last -> the block's output [B, C_out, H', W'] channels-last.

    The last convolution accumulates into the residual in place: the shortcut's output,
    else ``x`` itself when ``may_overwrite_input`` (else a copy of it).
    """
    out = block.conv1.prepacked_forward(x, relu=True)
    if isinstance(block, BottleneckBlock):
        out = block.conv2.prepacked_forward(out, relu=True)
    last = block.conv3 if isinstance(block, BottleneckBlock) else block.conv2
    if block.shortcut is not None:
        residual = block.shortcut.prepacked_forward(x)
    else:
        residual = x if may_overwrite_input else x.clone()
    return last.prepacked_add_(out, residual).relu_()


def prepacked_resnet_forward(body, tensor):
    """``body(tensor)`` for a ResNet that ``supports_prepacked_forward``, where
    ``prepacked_forward_applies``: tensor [B, 3, H, W] -> {name: features [B, C, h, w]
    channels-last} for ``body``'s output features. ``tensor`` is left unchanged."""
    x = tensor.contiguous(memory_format=torch.channels_last)
    x = F.max_pool2d(body.stem.conv1.prepacked_forward(x, relu=True), kernel_size=3, stride=2, padding=1)
    outputs = {"stem": x} if "stem" in body._out_features else {}
    returned = bool(outputs)  # whether x is an output feature, not to be overwritten
    for name, stage in zip(body.stage_names, body.stages):
        for block in stage:
            x = _block_forward(block, x, may_overwrite_input=not returned)
            returned = False
        if name in body._out_features:
            outputs[name] = x
            returned = True
    return outputs
