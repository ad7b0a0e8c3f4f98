"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021).

Each query looks at ``n_points`` sampled locations per head and feature level, around its
reference point, instead of at every position: the sampling offsets and the attention
weights are linear functions of the query. Values are read by bilinear interpolation
(``grid_sample``, zero padding, ``align_corners=False``), the definition of the reference
implementation's pure-PyTorch function, which its CUDA kernel computes too.

Shapes: ``N`` images, ``Lq`` queries, ``S`` flattened positions of all levels, ``M`` heads,
``L`` levels, ``P`` points, ``C`` channels (``C / M`` per head).
Locations are normalised to [0, 1] over each level's padded map, (x, y) with (0, 0) the
top-left corner.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleDeformableAttention", "multi_scale_deformable_attention", "sampling_locations"]


def multi_scale_deformable_attention(value, spatial_shapes, locations, weights):
    """The attention's core: weighted sum of bilinearly sampled values.

    Args:
        value: [N, S, M, C/M], the levels' maps flattened row-major one after another.
        spatial_shapes: [L, 2] int64 (H_l, W_l) of each level, or a list of (H_l, W_l)
            pairs (sizes read from tensor shapes, which stay symbolic in an export).
        locations: [N, Lq, M, L, P, 2] normalised (x, y) in [0, 1] per level.
        weights: [N, Lq, M, L, P], softmaxed jointly over L x P per head.
    Returns:
        [N, Lq, C].
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    shapes = spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes):
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, heads * head_dim, queries).transpose(1, 2)


def sampling_locations(reference_points, offsets, spatial_shapes):
    """Where each head samples each level.

    Args:
        reference_points: [N, Lq, L, 2] normalised (x, y) per level, or [N, Lq, L, 4] boxes
            (cx, cy, w, h) normalised.
        offsets: [N, Lq, M, L, P, 2] raw sampling offsets.
        spatial_shapes: [L, 2] int64 (H_l, W_l).
    Returns:
        [N, Lq, M, L, P, 2]: with 2-d points, point + offset / (W_l, H_l) (offsets in
        pixels of each level); with boxes, centre + offset / P * (w, h) / 2.
    """
    if reference_points.shape[-1] == 2:
        normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
        return reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        centres = reference_points[:, :, None, :, None, :2]
        sizes = reference_points[:, :, None, :, None, 2:]
        return centres + offsets / offsets.shape[-2] * sizes * 0.5
    raise ValueError(f"reference points must have 2 or 4 coordinates, got {reference_points.shape[-1]}")


class MultiScaleDeformableAttention(nn.Module):
    """The attention module, with the reference's parameter names (``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``) and initialisation.

    forward(query [N, Lq, C] (position embedding included), reference_points [N, Lq, L, 2|4],
    value_input [N, S, C], spatial_shapes [L, 2] int64, padding_mask [N, S] bool (True on
    padding) or None, level_shapes: the same (H_l, W_l) as a list of pairs of sizes, or None
    to read them from spatial_shapes) -> [N, Lq, C]. ``level_shapes`` keeps an exported
    graph's per-level split symbolic (values read from a tensor would be fixed in it).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"the hidden size {d_model} must be divisible by the number of heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Offsets start as each head's own direction (a ring of 1..P pixels), weights uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)[:, None]
        grid = directions[:, None, None, :] * steps[None, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def offsets_and_weights(self, query):
        """query [N, Lq, C] -> (offsets [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P])."""
        batch, queries, _ = query.shape
        shape = (batch, queries, self.n_heads, self.n_levels, self.n_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        logits = self.attention_weights(query).view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        return offsets, logits.softmax(-1).view(shape)

    def project_value(self, value_input, padding_mask):
        """[N, S, C] -> [N, S, M, C/M], zero on padding."""
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        return value.view(*value.shape[:2], self.n_heads, self.d_model // self.n_heads)

    def forward(self, query, reference_points, value_input, spatial_shapes, padding_mask=None, level_shapes=None):
        value = self.project_value(value_input, padding_mask)
        offsets, weights = self.offsets_and_weights(query)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        shapes = spatial_shapes if level_shapes is None else level_shapes
        return self.output_proj(multi_scale_deformable_attention(value, shapes, locations, weights))
