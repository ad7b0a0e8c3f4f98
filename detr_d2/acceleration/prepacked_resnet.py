"""Inference forward of a detectron2 ResNet on the CPU through oneDNN's fused convolutions.

detectron2's ``BasicStem``, ``BasicBlock`` and ``BottleneckBlock`` run each convolution,
then ``relu_`` and the residual ``+=`` as separate passes over the feature maps, and
every ``F.conv2d`` reorders its weight into oneDNN's blocked layout again. With every
conv + FrozenBatchNorm folded (``folded_norm.FrozenNormConv2d``), ``prepacked_resnet_forward``
computes the same blocks from the same modules with one oneDNN call per convolution: the
weight reordered once (cached per input shape, invalidated like the folded weights), the
ReLU applied by the convolution, and the block's last convolution accumulating into its
residual in place (oneDNN post-ops). Activations stay channels-last dense tensors
throughout. Parameters, buffers and state dicts are those of the ResNet; only the forward
differs, and only on the CPU: for the whole ResNet in eval without autograd, and in
training for its frozen prefix (the stem and stages that are not trained, FREEZE_AT),
which needs no autograd.
"""
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

from detr_d2.acceleration.folded_norm import FrozenNormConv2d

__all__ = ["prepacked_dtype", "prepacked_prefix_length", "prepacked_resnet_forward", "supports_prepacked_forward"]


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


def _is_frozen(part):
    return not any(parameter.requires_grad for parameter in part.parameters())


def prepacked_dtype(tensor):
    """The dtype the prepacked convolutions compute in for ``tensor`` (float32 on the CPU):
    bfloat16 under CPU autocast to bfloat16 (oneDNN's bf16 convolutions, what autocast's
    convolutions would do), else float32; None where they do not apply (other devices or
    dtypes, autocast to float16)."""
    if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None


def prepacked_prefix_length(body, tensor):
    """How many leading parts of ``body`` (the stem, then each stage) ``prepacked_resnet_forward``
    may run for ``tensor`` (float32 on the CPU, folding switched on, ``prepacked_dtype`` not
    None; else 0):

    * all of them in eval mode without autograd (inference);
    * in training mode, the frozen prefix: the leading parts none of whose parameters
      requires grad, as long as ``tensor`` does not require grad either. Nothing there needs
      a gradient, so computing it without autograd changes no gradient;
    * none in eval mode with autograd on (the channels-last module path).
    """
    if prepacked_dtype(tensor) is None or not body.stem.conv1.fold_norm:
        return 0
    parts = [body.stem, *body.stages]
    if not body.training:
        return 0 if torch.is_grad_enabled() else len(parts)
    if tensor.requires_grad:
        return 0
    length = 0
    while length < len(parts) and _is_frozen(parts[length]):
        length += 1
    return length


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
    return last.prepacked_add_(out, residual, relu=True)


def trainable_stage_input(x):
    """The prepacked prefix's channels-last features as the first trained stage's input: in
    float32 a contiguous (NCHW) copy (channels-last made float32 training slower), in
    bfloat16 (autocast) the channels-last features themselves, which oneDNN's bfloat16
    convolutions and their backward prefer (R50 training step 1.22 vs 1.63 s, docs/benchmark.md)."""
    return x if x.dtype == torch.bfloat16 else x.contiguous()


def prepacked_resnet_forward(body, tensor, prefix_length=None):
    """``body(tensor)`` for a ResNet that ``supports_prepacked_forward``: tensor [B, 3, H, W]
    -> {name: features [B, C, h, w]} for ``body``'s output features. ``tensor`` is left
    unchanged.

    The first ``prefix_length`` parts (stem, stages; all by default; at most
    ``prepacked_prefix_length``) run prepacked without autograd, their features
    channels-last; the later stages run as modules with autograd as usual, on a contiguous
    (NCHW) copy in float32 (channels-last made float32 training slower), channels-last in
    bfloat16 (``trainable_stage_input``).
    Under CPU autocast to bfloat16 the prepacked part computes in bfloat16 (weights folded in
    float32, then rounded) and its features are bfloat16, as autocast's convolutions give.
    """
    parts = 1 + len(body.stages)
    prefix_length = parts if prefix_length is None else prefix_length
    with torch.no_grad():
        x = tensor.to(prepacked_dtype(tensor)).contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(body.stem.conv1.prepacked_forward(x, relu=True), kernel_size=3, stride=2, padding=1)
    outputs = {"stem": x} if "stem" in body._out_features else {}
    returned = bool(outputs)  # whether x is an output feature, not to be overwritten
    for part, (name, stage) in enumerate(zip(body.stage_names, body.stages), start=1):
        if part < prefix_length:
            with torch.no_grad():
                for block in stage:
                    x = _block_forward(block, x, may_overwrite_input=not returned)
                    returned = False
        else:
            x = stage(trainable_stage_input(x) if part == prefix_length else x)
        if name in body._out_features:
            outputs[name] = x
            returned = True
    return outputs
