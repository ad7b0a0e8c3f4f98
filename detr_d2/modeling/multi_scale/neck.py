"""The multi-scale neck of Deformable DETR and DINO: backbone levels -> hidden-size maps.

Each backbone level (e.g. res3, res4, res5: strides 8, 16, 32) goes through a 1x1
convolution + GroupNorm(32); further levels come from a 3x3 stride-2 convolution +
GroupNorm, the first on the last backbone map, the next ones on the previous extra level.
Parameter names follow the reference (``input_proj.{level}.{0: conv, 1: norm}``).
"""
from torch import nn

from detr_d2.modeling.backbone import feature_padding_mask

__all__ = ["MultiScaleProjection"]

GROUP_NORM_GROUPS = 32


def _conv_norm(in_channels, hidden_dim, kernel_size, stride):
    conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(GROUP_NORM_GROUPS, hidden_dim))


class MultiScaleProjection(nn.ModuleList):
    """``input_proj``: ``len(in_channels)`` projected backbone levels + extra levels up to
    ``num_levels`` (a ModuleList of conv + norm pairs).

    forward(levels: list of [B, C_l, h_l, w_l] finest first, pixel_mask [B, H, W] bool,
    level_masks: the levels' [B, h_l, w_l] bool masks) -> (maps: ``num_levels`` maps
    [B, hidden_dim, h_l, w_l], masks: ``num_levels`` [B, h_l, w_l] bool, True on padding;
    the extra levels' masks by nearest resizing of the pixel mask).
    """

    def __init__(self, in_channels, hidden_dim, num_levels):
        if num_levels < len(in_channels):
            raise ValueError(f"MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS {num_levels} is below the number of "
                             f"MODEL.MULTI_SCALE.IN_FEATURES ({len(in_channels)})")
        if hidden_dim % GROUP_NORM_GROUPS:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM {hidden_dim} must be a multiple of {GROUP_NORM_GROUPS} "
                             "(the neck's GroupNorm groups)")
        projections = [_conv_norm(channels, hidden_dim, 1, 1) for channels in in_channels]
        extra_inputs = [in_channels[-1]] + [hidden_dim] * (num_levels - len(in_channels) - 1)
        projections += [_conv_norm(channels, hidden_dim, 3, 2) for channels in extra_inputs[:num_levels - len(in_channels)]]
        super().__init__(projections)
        self.num_backbone_levels = len(in_channels)

    def forward(self, levels, pixel_mask, level_masks):
        maps = [projection(level) for projection, level in zip(self, levels)]
        masks = list(level_masks)
        previous = levels[-1]
        for projection in list(self)[self.num_backbone_levels:]:
            previous = projection(previous)
            maps.append(previous)
            masks.append(feature_padding_mask(pixel_mask, previous.shape[-2:]))
        return maps, masks
