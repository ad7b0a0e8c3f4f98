"""Multi-scale deformable attention as one weighted gather over all levels (CPU).

The plain computation (``detr_d2.modeling.multi_scale.deformable_attention``) calls
``grid_sample`` once per level on [N*M, C/M, H_l, W_l] maps, stacks the per-level samples
into an [N*M, C/M, Lq, L*P] tensor and multiplies it by the attention weights. Here the
same numbers come from one ``F.embedding_bag`` (mode "sum", per-sample weights) over the
projected values laid out as [N*S'*M, C/M] rows (one row per image, position and head:
channels last), with few passes over the [N, Lq, M, L, P] samples:

* each level's map gets a border of 2 zero cells on every side, so that a location's 4
  bilinear corners are always rows of the table and zero padding needs no mask: the pixel
  coordinate (``align_corners=False``: x = location_x * W_l - 0.5), shifted by the border,
  is clamped into [0, W_l + 2], where every corner outside the map reads a zero (a clamped
  location's corners all lie in the border: no value, no gradient, as with ``grid_sample``),
  and truncated to its top-left corner;
* in the module the pixel coordinates come straight from the reference points and the
  offsets (reference_x * W_l - 0.5 + offset_x for points, whose offsets are in pixels; for
  boxes the offset is scaled by the box size), without the normalised locations between;
* the corners' rows are the top-left corner's row plus a per-level constant, and the
  attention weight is folded into the 4 bilinear weights, so each (image, query, head) is
  one bag of L * P * 4 weighted rows summed straight into the output [N, Lq, C]: no
  per-level sample stack and no [.., Lq, L*P] intermediate.

``FastMultiScaleDeformableAttention`` gathers at inference (no autograd); in training it
keeps ``grid_sample``. The gather is differentiable all the same: gradients flow by
autograd to the values through ``embedding_bag``'s backward (and the border's copy), to
the attention weights and (through the bilinear weights) to the locations as
``grid_sample``'s gradient does. The truncation has no gradient, as the floor
has none there. A location exactly on a cell border (an integer pixel coordinate, as the
initial offsets give) has a one-sided gradient whose side depends on the last bit of the
coordinate; it can differ from ``grid_sample``'s, which rounds the coordinate through the
grid 2 * location - 1 (the reference's CUDA kernel computes location * W_l - 0.5, as here).

Under autocast the pixel coordinates and corner weights are computed in float32 (a
location in bfloat16 would be off by up to half a cell on a 134-column level); the gather
reads the values in their own dtype (bfloat16 under CPU autocast) with the folded weights
rounded to it, and sums in float32 inside the kernel.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from detr_d2.modeling.multi_scale.deformable_attention import MultiScaleDeformableAttention

__all__ = ["FastMultiScaleDeformableAttention", "bordered_levels", "gathered_deformable_attention", "sampling_pixels"]

BORDER = 2  # zero cells around each level's map


class BorderedLevels(NamedTuple):
    """The value table of ``bordered_levels``: ``table`` [N * S' * M, C/M]; per level
    ``sizes`` [L, 2] (W_l, H_l) float32, ``bounds`` [L, 1, 2] (W_l + 2, H_l + 2): the largest
    shifted pixel coordinate, ``row_steps`` [L, 1, 2] int (rows one column / one line
    further: M, (W_l + 4) * M), ``corner_steps`` [L, 1, 4] int (the 4 corners' rows from the
    top-left one), ``first_rows`` [N, 1, M, L, 1] int (the row of each image, head and
    level's first bordered cell)."""

    table: torch.Tensor
    sizes: torch.Tensor
    bounds: torch.Tensor
    row_steps: torch.Tensor
    corner_steps: torch.Tensor
    first_rows: torch.Tensor


def _copy_with_border(level, bordered):
    """Write ``level`` [N, H, W, ...] into the middle of ``bordered`` [N, H + 4, W + 4, ...]
    and zeros around it."""
    bordered[:, :BORDER].zero_()
    bordered[:, -BORDER:].zero_()
    bordered[:, BORDER:-BORDER, :BORDER].zero_()
    bordered[:, BORDER:-BORDER, -BORDER:].zero_()
    bordered[:, BORDER:-BORDER, BORDER:-BORDER].copy_(level)


def bordered_levels(value, spatial_shapes):
    """value [N, S, M, C/M] (levels flattened row-major one after another), spatial_shapes
    [L, 2] (H_l, W_l) or pairs -> ``BorderedLevels`` (each level's map with a zero border;
    one copy of the values)."""
    batch, _, heads, head_dim = value.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    widths = [w + 2 * BORDER for _, w in shapes]
    areas = [(h + 2 * BORDER) * width for (h, _), width in zip(shapes, widths)]
    table = value.new_empty(batch, sum(areas), heads, head_dim)
    for level, (height, width), bordered_width, area, start in zip(
            value.split([h * w for h, w in shapes], dim=1), shapes, widths, areas,
            [sum(areas[:index]) for index in range(len(shapes))]):
        _copy_with_border(level.view(batch, height, width, heads, head_dim),
                          table[:, start:start + area].view(batch, -1, bordered_width, heads, head_dim))
    index_dtype = torch.int32 if table.numel() // head_dim < 2 ** 31 else torch.int64
    device = value.device

    def per_level(rows, dtype=index_dtype):
        return torch.tensor(rows, dtype=dtype, device=device).view(len(shapes), 1, -1)

    starts = [sum(areas[:level]) for level in range(len(shapes))]
    images = torch.arange(batch, dtype=index_dtype, device=device).view(batch, 1, 1, 1, 1) * (sum(areas) * heads)
    image_heads = images + torch.arange(heads, dtype=index_dtype, device=device).view(1, 1, heads, 1, 1)
    return BorderedLevels(
        table=table.view(-1, head_dim),
        sizes=per_level([[w, h] for h, w in shapes], torch.float32).view(-1, 2),
        bounds=per_level([[w + BORDER, h + BORDER] for h, w in shapes], torch.float32),
        row_steps=per_level([[heads, width * heads] for width in widths]),
        corner_steps=per_level([[0, heads, width * heads, (width + 1) * heads] for width in widths]),
        first_rows=image_heads + per_level([start * heads for start in starts]).view(1, 1, 1, -1, 1))


def sampling_pixels(reference_points, offsets, sizes):
    """Pixel coordinates of the sampling locations of ``sampling_locations``.

    Args:
        reference_points: [N, Lq, L, 2] normalised points or [N, Lq, L, 4] boxes (cx, cy, w, h).
        offsets: [N, Lq, M, L, P, 2] raw sampling offsets.
        sizes: [L, 2] (W_l, H_l).
    Returns:
        [N, Lq, M, L, P, 2] (x, y) with (0, 0) the centre of the top-left cell (float32, or
        float64 for float64 references).
    """
    precise = torch.promote_types(reference_points.dtype, torch.float32)
    references = reference_points.to(precise)
    sizes = sizes.to(precise)
    offsets = offsets.to(precise)
    if references.shape[-1] == 2:
        return offsets + (references * sizes - 0.5)[:, :, None, :, None, :]
    if references.shape[-1] == 4:
        centres = (references[..., :2] * sizes - 0.5)[:, :, None, :, None, :]
        scales = (references[..., 2:] * sizes * (0.5 / offsets.shape[-2]))[:, :, None, :, None, :]
        return torch.addcmul(centres, offsets, scales)
    raise ValueError(f"reference points must have 2 or 4 coordinates, got {references.shape[-1]}")


def folded_corners(pixels, weights, levels):
    """The 4 bilinear corners of every sampling location and their weights times the
    attention weight.

    Args:
        pixels: [N, Lq, M, L, P, 2] pixel coordinates (float32 or float64).
        weights: [N, Lq, M, L, P] attention weights.
        levels: ``BorderedLevels``.
    Returns:
        (rows [N, Lq, M, L, P, 4] of ``levels.table``, weights [N, Lq, M, L, P, 4] in the
        dtype of ``pixels``), corners ordered (y0, x0), (y0, x1), (y1, x0), (y1, x1).
    """
    shifted = torch.clamp(pixels + BORDER, min=pixels.new_zeros(()), max=levels.bounds.to(pixels.dtype))
    cells = shifted.detach().to(levels.row_steps.dtype)  # truncation: the floor of a non-negative number
    fraction = shifted - cells
    steps = cells * levels.row_steps
    top_left = torch.add(steps[..., 0], steps[..., 1]).add_(levels.first_rows)
    rows = top_left[..., None] + levels.corner_steps
    fx, fy = fraction.unbind(-1)
    lower = weights.to(pixels.dtype) * fy
    weights_y = torch.stack([weights - lower, lower], -1)
    weights_x = torch.stack([1 - fx, fx], -1)
    return rows, (weights_y[..., :, None] * weights_x[..., None, :]).flatten(-2)


def gather_at_pixels(levels, pixels, weights, value_dtype):
    """The weighted gather of ``levels`` at ``pixels`` [N, Lq, M, L, P, 2] with ``weights``
    [N, Lq, M, L, P] -> [N, Lq, C]."""
    batch, queries, heads = pixels.shape[:3]
    rows, folded = folded_corners(pixels, weights, levels)
    bag = rows.shape[3] * rows.shape[4] * 4
    output = F.embedding_bag(rows.view(-1, bag), levels.table, per_sample_weights=folded.view(-1, bag).to(value_dtype),
                             mode="sum")
    return output.view(batch, queries, heads * levels.table.shape[1])


def gathered_deformable_attention(value, spatial_shapes, locations, weights):
    """``multi_scale_deformable_attention`` computed as one weighted gather (see module doc).

    Args:
        value: [N, S, M, C/M]; spatial_shapes: [L, 2] (H_l, W_l) or a list of pairs;
        locations: [N, Lq, M, L, P, 2] normalised (x, y); weights: [N, Lq, M, L, P].
    Returns:
        [N, Lq, C] in the dtype of ``value``.
    """
    levels = bordered_levels(value, spatial_shapes)
    precise = torch.promote_types(locations.dtype, torch.float32)
    pixels = torch.addcmul(torch.full((), -0.5, dtype=precise), locations.to(precise),
                           levels.sizes[:, None, :].to(precise))
    return gather_at_pixels(levels, pixels, weights, value.dtype)


class FastMultiScaleDeformableAttention(MultiScaleDeformableAttention):
    """``MultiScaleDeformableAttention`` (same parameters, no state of its own) that samples
    with the weighted gather while ``fast_sampling`` is True, on the CPU without autograd
    (inference); with autograd (training) and on other devices ``grid_sample`` runs
    unchanged: the gather's backward was measured slower than ``grid_sample``'s, and the
    gather on the CPU only."""

    fast_sampling = True

    def forward(self, query, reference_points, value_input, spatial_shapes, padding_mask=None, level_shapes=None):
        if not (self.fast_sampling and value_input.device.type == "cpu" and not torch.is_grad_enabled()):
            return super().forward(query, reference_points, value_input, spatial_shapes, padding_mask, level_shapes)
        value = self.project_value(value_input, padding_mask)
        levels = bordered_levels(value, spatial_shapes if level_shapes is None else level_shapes)
        offsets, weights = self.offsets_and_weights(query)
        pixels = sampling_pixels(reference_points, offsets, levels.sizes)
        return self.output_proj(gather_at_pixels(levels, pixels, weights, value.dtype))
