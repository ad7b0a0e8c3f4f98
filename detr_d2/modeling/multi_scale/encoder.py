"""The deformable encoder shared by Deformable DETR and DINO, and the flattening of the
multi-scale maps that its attention reads.

Every position of every level attends, by multi-scale deformable attention, to sampled
positions of all levels around its own place; layers are post-norm (attention, add, norm;
FFN, add, norm). Parameter names follow the reference (``layers.{i}.self_attn``, ``norm1``,
``linear1``, ``linear2``, ``norm2``).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from detr_d2.modeling.multi_scale.deformable_attention import MultiScaleDeformableAttention

__all__ = ["DeformableEncoder", "DeformableEncoderLayer", "FlatLevels", "feed_forward", "flatten_levels",
           "valid_ratios"]


class FlatLevels(NamedTuple):
    """The multi-scale maps as one sequence.

    features [B, S, C] and pos [B, S, C] (position + level embedding), mask [B, S] bool
    (True on padding), spatial_shapes [L, 2] int64 (H_l, W_l), valid_ratios [B, L, 2]
    (x, y): the unpadded fraction of each level's width and height; level_shapes: the
    (H_l, W_l) pairs as the maps' sizes, for Python loops over the levels (symbolic sizes
    in a traced or exported graph, where values read from spatial_shapes would be fixed).
    """

    features: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    spatial_shapes: torch.Tensor
    valid_ratios: torch.Tensor
    level_shapes: list


def valid_ratios(mask):
    """[B, H, W] bool padding mask -> [B, 2] (unpadded columns / W, unpadded rows / H)."""
    _, height, width = mask.shape
    valid_height = (~mask[:, :, 0]).sum(1).float() / height
    valid_width = (~mask[:, 0, :]).sum(1).float() / width
    return torch.stack([valid_width, valid_height], -1)


def shapes_tensor(level_shapes, device):
    """[(H_l, W_l)] sizes -> [L, 2] int64, built size by size (``torch.full``), which keeps
    them symbolic under ``torch.jit.trace`` and ``torch.export`` alike."""
    return torch.stack([torch.stack([torch.full((), size, dtype=torch.long, device=device) for size in shape])
                        for shape in level_shapes])


def flatten_levels(maps, masks, positions, level_embed):
    """maps / positions: per level [B, C, h, w]; masks: per level [B, h, w]; level_embed:
    [L, C] -> ``FlatLevels`` (row-major positions, levels one after another)."""
    level_shapes = [tuple(m.shape[-2:]) for m in maps]
    spatial_shapes = shapes_tensor(level_shapes, maps[0].device)
    features = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
    pos = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[i].view(1, 1, -1) for i, p in enumerate(positions)], 1)
    mask = torch.cat([m.flatten(1) for m in masks], 1)
    ratios = torch.stack([valid_ratios(m) for m in masks], 1)
    return FlatLevels(features, pos, mask, spatial_shapes, ratios, level_shapes)


def feed_forward(x, linear1, linear2, dropout_inner, dropout_outer, norm):
    """The post-norm FFN block of both layer types: norm(x + dropout(linear2(dropout(relu(linear1(x)))))).
    The ReLU overwrites linear1's fresh output (no second [.., d_ffn] tensor; exact)."""
    return norm(x + dropout_outer(linear2(dropout_inner(F.relu(linear1(x), inplace=True)))))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm.

    forward(src [B, S, C], pos [B, S, C], reference_points [B, S, L, 2], spatial_shapes
    [L, 2], padding_mask [B, S], level_shapes (see ``FlatLevels``) or None) -> [B, S, C].
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask, level_shapes=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask, level_shapes)
        src = self.norm1(src + self.dropout1(attended))
        return feed_forward(src, self.linear1, self.linear2, self.dropout2, self.dropout3, self.norm2)


def encoder_reference_points(level_shapes, ratios):
    """Each position's centre as the reference point on every level.

    level_shapes [(H_l, W_l)], ratios [B, L, 2] -> [B, S, L, 2]: the centre of
    each cell, normalised by its level's unpadded size, then scaled by every level's valid
    ratio (so that it points at the same image place on each level).
    """
    points = []
    for level, (height, width) in enumerate(level_shapes):
        y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=ratios.device) + 0.5,
                              torch.arange(width, dtype=torch.float32, device=ratios.device) + 0.5, indexing="ij")
        y = y.reshape(-1)[None] / (ratios[:, None, level, 1] * height)
        x = x.reshape(-1)[None] / (ratios[:, None, level, 0] * width)
        points.append(torch.stack((x, y), -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


class DeformableEncoder(nn.Module):
    """``num_layers`` ``DeformableEncoderLayer``s (``layers``).

    forward(levels: FlatLevels) -> memory [B, S, C].
    """

    def __init__(self, num_layers, **layer_arguments):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_arguments) for _ in range(num_layers))

    def forward(self, levels):
        reference_points = encoder_reference_points(levels.level_shapes, levels.valid_ratios)
        output = levels.features
        for layer in self.layers:
            output = layer(output, levels.pos, reference_points, levels.spatial_shapes, levels.mask,
                           levels.level_shapes)
        return output
