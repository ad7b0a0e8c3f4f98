"""A detectron2 backbone that also returns DETR's padding mask for its feature map."""
import torch
import torch.nn.functional as F
from torch import nn


def pixel_padding_mask(image_sizes, padded_shape, device):
    """[B, H, W] bool, True on the bottom/right padding of each image in the batch.

    ``image_sizes`` are the unpadded (h, w) of each image: a list of pairs, or an int64
    tensor [B, 2]; ``padded_shape`` is (H, W). Built from index comparisons, so a traced or
    exported model computes it from its inputs. (Pairs of 0-dim tensors, as ImageList holds
    them while a model is traced, are read as numbers.)
    """
    if not torch.is_tensor(image_sizes):
        image_sizes = [[int(height), int(width)] for height, width in image_sizes]
    sizes = torch.as_tensor(image_sizes, device=device).reshape(-1, 2)
    rows = torch.arange(padded_shape[0], device=device)[None, :, None]
    columns = torch.arange(padded_shape[1], device=device)[None, None, :]
    return (rows >= sizes[:, 0, None, None]) | (columns >= sizes[:, 1, None, None])


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
    (features [B, C, h', w'] of ``in_feature``, mask [B, h', w'] bool, True on padding).
    """

    def __init__(self, body, in_feature="res5"):
        super().__init__()
        if in_feature not in body.output_shape():
            raise ValueError(f"MODEL.DETR.IN_FEATURE {in_feature!r} is not an output of the backbone "
                             f"(it has {sorted(body.output_shape())}); check MODEL.RESNETS.OUT_FEATURES")
        self.body = body
        self.in_feature = in_feature
        self.num_channels = body.output_shape()[in_feature].channels

    def body_features(self, tensor):
        """{name: [B, C, h, w]}: every output feature of the body for the padded batch."""
        return self.body(tensor)

    def all_features_and_mask(self, tensor, image_sizes):
        """({name: [B, C, h, w]} every body output, mask [B, h', w'] of ``in_feature``)."""
        features = self.body_features(tensor)
        pixel_mask = pixel_padding_mask(image_sizes, tensor.shape[-2:], tensor.device)
        return features, feature_padding_mask(pixel_mask, features[self.in_feature].shape[-2:])

    def forward(self, tensor, image_sizes):
        features, mask = self.all_features_and_mask(tensor, image_sizes)
        return features[self.in_feature], mask

    def levels_and_masks(self, tensor, image_sizes, names):
        """The features ``names`` (finest first) with their padding masks:
        ([B, C_l, h_l, w_l] per name, [B, h_l, w_l] bool per name, pixel mask [B, H, W])."""
        features = self.body_features(tensor)
        pixel_mask = pixel_padding_mask(image_sizes, tensor.shape[-2:], tensor.device)
        levels = [features[name] for name in names]
        return levels, [feature_padding_mask(pixel_mask, level.shape[-2:]) for level in levels], pixel_mask
