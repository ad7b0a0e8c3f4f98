"""A detectron2 backbone that also returns DETR's padding mask for its feature map."""
import torch
import torch.nn.functional as F
from torch import nn

from detr_d2.modeling.inference_backbone import prepacked_prefix_length, prepacked_resnet_forward


def pixel_padding_mask(image_sizes, padded_shape, device):
    """[B, H, W] bool, True on the bottom/right padding of each image in the batch.

    ``image_sizes`` are the unpadded (h, w) of each image; ``padded_shape`` is (H, W).
    """
    mask = torch.ones((len(image_sizes), *padded_shape), dtype=torch.bool, device=device)
    for i, (height, width) in enumerate(image_sizes):
        mask[i, :height, :width] = False
    return mask


def feature_padding_mask(pixel_mask, feature_shape):
    """Resize a pixel mask [B, H, W] to a feature map's (h, w) by nearest neighbour, as the
    reference does (on the mask as float, back to bool)."""
    return F.interpolate(pixel_mask[None].float(), size=feature_shape).to(torch.bool)[0]


def undilate_first_res5_block(body):
    """Make a dilated res5 compute what torchvision's ``replace_stride_with_dilation`` does.

    detectron2 gives every res5 block dilation 2; torchvision (hence the reference DC5
    models) keeps the first block's 3x3 conv at dilation 1 (stride removed) and dilates
    only the later blocks. Padding follows the dilation, so shapes are unchanged.
    """
    conv = body.res5[0].conv2
    conv.dilation = (1, 1)
    conv.padding = (1, 1)


class MaskedBackbone(nn.Module):
    """Wraps ``body`` (any detectron2 Backbone) and returns one feature map with its mask.

    forward(tensor [B, 3, H, W] padded, image_sizes [(h, w)] unpadded) ->
    (features [B, C, h', w'], mask [B, h', w'] bool, True on padding).
    With ``channels_last``, in eval mode the body runs on a channels-last copy of ``tensor``
    (oneDNN's preferred layout on CPU; it carries through convolutions, pooling and ReLU)
    and the features come out channels-last: the same values, another memory layout.
    Training keeps the default layout: channels-last made the R50 training iteration
    slower (1.2x the CPU time, docs/benchmark.md).
    With ``prepacked`` (a ResNet that ``supports_prepacked_forward``), on the CPU the body
    runs ``prepacked_resnet_forward`` instead: oneDNN convolutions on weights reordered
    once, ReLU and residual additions fused into them, for the whole body in eval without
    autograd (features channels-last) and for its frozen stem and stages in training; the
    same values up to float rounding.
    """

    def __init__(self, body, in_feature="res5", channels_last=False, prepacked=False):
        super().__init__()
        if in_feature not in body.output_shape():
            raise ValueError(f"MODEL.DETR.IN_FEATURE {in_feature!r} is not an output of the backbone "
                             f"(it has {sorted(body.output_shape())}); check MODEL.RESNETS.OUT_FEATURES")
        self.body = body
        self.in_feature = in_feature
        self.num_channels = body.output_shape()[in_feature].channels
        self.channels_last = channels_last
        self.prepacked = prepacked

    def forward(self, tensor, image_sizes):
        prefix_length = prepacked_prefix_length(self.body, tensor) if self.prepacked else 0
        if prefix_length:
            features = prepacked_resnet_forward(self.body, tensor, prefix_length)[self.in_feature]
        else:
            if self.channels_last and not self.training:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            features = self.body(tensor)[self.in_feature]
        pixel_mask = pixel_padding_mask(image_sizes, tensor.shape[-2:], tensor.device)
        return features, feature_padding_mask(pixel_mask, features.shape[-2:])
