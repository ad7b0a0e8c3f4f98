"""Multi-scale deformable attention as weighted row gathers over all levels (CPU, inference
and training).

The plain computation (``detr_d2.modeling.multi_scale.deformable_attention``) calls
``grid_sample`` once per level on [N*M, C/M, H_l, W_l] maps, stacks the per-level samples
into an [N*M, C/M, Lq, L*P] tensor and multiplies it by the attention weights; its backward
goes through the same large tensors. Here the values are one table of rows [N * S' * M, C/M]
(one row per image, bordered position and head: channels last) and the output is four
``F.embedding_bag`` sums (mode "sum", per-sample weights), one per bilinear corner: each
(image, query, head) is a bag of the L * P corner rows of its sampling points, weighted by
the corner's bilinear weight times the point's attention weight, summed straight into the
output [N, Lq, C]; no per-level sample stack.

* Each level's map gets a border of 2 zero cells on every side, so that a location's 4
  bilinear corners are always rows of the table and zero padding needs no mask: the pixel
  coordinate (``align_corners=False``: x = location_x * W_l - 0.5), shifted by the border,
  is clamped into [0, W_l + 2], where every corner outside the map reads a zero (a clamped
  location's corners all lie in the border: no value, no gradient, as with ``grid_sample``),
  and truncated to its top-left corner.
* Coordinates, corners and weights are computed "structure of arrays": x, y, attention
  weights and rows as [N, Lq, K] tensors, K = M * L * P in the order of the module's
  projections (head, level, point), so that every elementwise pass runs over contiguous
  memory with per-(head, level, point) constants broadcast along the queries. The module
  takes x and y straight from the reference points and the sampling-offset projection (its
  rows reordered to give all x offsets, then all y offsets), without the normalised
  locations in between: reference_x * W_l - 0.5 + offset_x for points (offsets in pixels),
  the offset scaled by the box size for boxes.
* ``CornerGather`` (an autograd Function) is the gather. Its backward gives the gradient of
  every corner weight as the dot product of the output gradient with the corner's value row
  (``torch.sparse.sampled_addmm`` on the bags' pattern) and the table's gradient as the
  transposed gather: the top-left rows are sorted once (a row's 4 corners keep that order,
  as a corner is a per-level constant step away inside its own level and head), and each
  corner's table gradient is an ``embedding_bag`` over the output gradients of the bags
  that read the row. The gradients to the attention weights and locations follow by
  autograd through the bilinear weights, as ``grid_sample``'s do. The truncation has no
  gradient, as the floor has none there; a location exactly on a cell border (an integer
  pixel coordinate, as the initial offsets give) has a one-sided gradient whose side depends
  on the last bit of the coordinate: it can differ from ``grid_sample``'s, which rounds the
  coordinate through the grid 2 * location - 1 (the reference's CUDA kernel computes
  location * W_l - 0.5, as here).

Under autocast the pixel coordinates and corner weights are computed in float32 (a location
in bfloat16 would be off by up to half a cell on a 134-column level) and so is the gather:
the table holds the values (bfloat16 under CPU autocast) converted to float32 while it is
built; the output comes back in the values' dtype.
"""
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from detr_d2.modeling.multi_scale.deformable_attention import MultiScaleDeformableAttention

__all__ = ["CornerGather", "FastMultiScaleDeformableAttention", "SamplingLayout", "bilinear_gather",
           "bordered_table", "gathered_deformable_attention", "sampling_layout", "sampling_pixels", "table_dtype"]

BORDER = 2  # zero cells around each level's map


class SamplingLayout(NamedTuple):
    """Per-call constants of the gather for N images, levels (H_l, W_l), M heads and P points,
    K = M * L * P (head, level, point):

    ``rows`` the table's row count (N * S' * M, S' the bordered positions of all levels);
    ``level_of`` [K] int64: the level of each k; ``sizes`` [L, 2] float32 (W_l, H_l);
    ``bounds`` [2, K] float32: the largest shifted pixel coordinate (W_l + 2, H_l + 2);
    ``line_steps`` [K] int: rows one line further ((W_l + 4) * M); ``first_rows`` [N, 1, K]
    int: the row of each image, head and level's first bordered cell; ``points_per_bag``
    L * P; ``heads`` M.
    """

    rows: int
    level_of: torch.Tensor
    sizes: torch.Tensor
    bounds: torch.Tensor
    line_steps: torch.Tensor
    first_rows: torch.Tensor
    points_per_bag: int
    heads: int


def level_pairs(spatial_shapes):
    """[L, 2] tensor or (H_l, W_l) pairs -> list of (int, int)."""
    return [(int(h), int(w)) for h, w in spatial_shapes]


def sampling_layout(shapes, batch, heads, points, device):
    """``SamplingLayout`` of ``shapes`` (list of (H_l, W_l)) for ``batch`` images."""
    levels = len(shapes)
    widths = [w + 2 * BORDER for _, w in shapes]
    areas = [(h + 2 * BORDER) * width for (h, _), width in zip(shapes, widths)]
    starts = [sum(areas[:level]) for level in range(levels)]
    rows = batch * sum(areas) * heads
    index_dtype = torch.int32 if rows < 2 ** 31 else torch.int64

    def per_k(values, dtype):
        """A per-level list -> [K] repeating it over (head, level, point)."""
        return torch.tensor(values, dtype=dtype, device=device).view(1, levels, 1).expand(
            heads, levels, points).reshape(-1)

    head_of = torch.arange(heads, dtype=index_dtype, device=device).view(heads, 1, 1).expand(
        heads, levels, points).reshape(-1)
    images = torch.arange(batch, dtype=index_dtype, device=device).view(batch, 1, 1) * (sum(areas) * heads)
    return SamplingLayout(
        rows=rows,
        level_of=per_k(list(range(levels)), torch.int64),
        sizes=torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=device),
        bounds=torch.stack([per_k([w + BORDER for _, w in shapes], torch.float32),
                            per_k([h + BORDER for h, _ in shapes], torch.float32)]),
        line_steps=per_k([width * heads for width in widths], index_dtype),
        first_rows=images + (per_k([start * heads for start in starts], index_dtype) + head_of).view(1, 1, -1),
        points_per_bag=levels * points,
        heads=heads)


def _level_blocks(table, shapes, batch, heads, head_dim):
    """Views of ``table`` [N, S', M, C/M]: each level's bordered map [N, H_l + 4, W_l + 4, M, C/M]."""
    blocks, start = [], 0
    for height, width in shapes:
        area = (height + 2 * BORDER) * (width + 2 * BORDER)
        blocks.append(table[:, start:start + area].view(batch, height + 2 * BORDER, width + 2 * BORDER, heads,
                                                        head_dim))
        start += area
    return blocks


class BorderedTable(torch.autograd.Function):
    """value [N, S, M, C/M] -> the table [N * S' * M, C/M] in ``dtype``: each level's map
    with a border of zeros. The backward reads each level's interior out of the table's
    gradient (one pass; autograd's in-place copies into views would clone the whole table
    gradient per copy)."""

    @staticmethod
    def forward(ctx, value, shapes, dtype):
        batch, _, heads, head_dim = value.shape
        ctx.shapes, ctx.value_shape, ctx.value_dtype = shapes, value.shape, value.dtype
        areas = [(h + 2 * BORDER) * (w + 2 * BORDER) for h, w in shapes]
        table = value.new_empty(batch, sum(areas), heads, head_dim, dtype=dtype)
        levels = value.split([h * w for h, w in shapes], dim=1)
        for level, bordered, (height, width) in zip(levels, _level_blocks(table, shapes, batch, heads, head_dim),
                                                    shapes):
            bordered[:, :BORDER].zero_()
            bordered[:, -BORDER:].zero_()
            bordered[:, BORDER:-BORDER, :BORDER].zero_()
            bordered[:, BORDER:-BORDER, -BORDER:].zero_()
            bordered[:, BORDER:-BORDER, BORDER:-BORDER].copy_(level.view(batch, height, width, heads, head_dim))
        return table.view(-1, head_dim)

    @staticmethod
    def backward(ctx, grad):
        batch, _, heads, head_dim = ctx.value_shape
        grad = grad.view(batch, -1, heads, head_dim)
        grad_value = grad.new_empty(ctx.value_shape, dtype=ctx.value_dtype)
        start = 0
        for bordered, (height, width) in zip(_level_blocks(grad, ctx.shapes, batch, heads, head_dim), ctx.shapes):
            grad_value[:, start:start + height * width].view(batch, height, width, heads, head_dim).copy_(
                bordered[:, BORDER:-BORDER, BORDER:-BORDER])
            start += height * width
        return grad_value, None, None


def bordered_table(value, shapes, dtype=torch.float32):
    """value [N, S, M, C/M] (levels flattened row-major one after another), ``shapes`` list of
    (H_l, W_l) -> the table [N * S' * M, C/M] in ``dtype``: each level's map with a border of
    zeros (one copy of the values; ``BorderedTable``)."""
    return BorderedTable.apply(value, shapes, dtype)


class CornerGather(torch.autograd.Function):
    """out[b] = sum over corners c and j of weights_c[b, j] * table[top_left[b, j] + steps_c[j]].

    table [R, D] float; top_left [B, J] int rows of the top-left corners; steps [3, J] int:
    the (y0, x1), (y1, x0), (y1, x1) corners' rows relative to the top-left one; weights:
    4 tensors [B, J] in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1). Returns [B, D].
    Gradients flow to the table and the weights (see the module docstring).
    """

    @staticmethod
    def forward(ctx, table, top_left, steps, w00, w01, w10, w11):
        weights = (w00, w01, w10, w11)
        corners = corner_rows(top_left, steps)
        output = None
        for rows, weight in zip(corners, weights):
            summed = F.embedding_bag(rows, table, per_sample_weights=weight, mode="sum")
            output = summed if output is None else output.add_(summed)
        ctx.save_for_backward(table, top_left, steps, *weights)
        return output

    @staticmethod
    def backward(ctx, grad):
        table, top_left, steps, *weights = ctx.saved_tensors
        grad = grad.contiguous()
        corners = corner_rows(top_left, steps)
        grad_weights = [None] * 4
        if any(ctx.needs_input_grad[3:]):
            grad_weights = [corner_dots(grad, table, rows) for rows in corners]
        grad_table = transposed_gather(grad, top_left, steps, weights, table.shape[0]) \
            if ctx.needs_input_grad[0] else None
        return (grad_table, None, None, *grad_weights)


def corner_rows(top_left, steps):
    """The 4 corners' rows [B, J]: top-left, then top-left + each of ``steps`` [3, J]."""
    return [top_left] + [top_left + step for step in steps]


def corner_dots(grad, table, rows):
    """[B, J]: the dot product of grad[b] [B, D] with table[rows[b, j]]."""
    bags, per_bag = rows.shape
    pointers = torch.arange(0, bags * per_bag + 1, per_bag, dtype=rows.dtype, device=rows.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that sparse CSR support is in beta
        pattern = torch.sparse_csr_tensor(pointers, rows.reshape(-1), grad.new_zeros(bags * per_bag),
                                          size=(bags, table.shape[0]))
        return torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0).values().view(bags, per_bag)


def transposed_gather(grad, top_left, steps, weights, table_rows):
    """The table's gradient [R, D]: each row gets the sum of grad[b] * weight over the
    (bag b, corner) entries that read it. The entries are sorted by their top-left row once;
    each corner's rows keep that order (a per-level step inside the row's own level, image and
    head block), so each corner is one ``embedding_bag`` over the sorted entries with a bag
    per table row."""
    bags, per_bag = top_left.shape
    order = torch.argsort(top_left.reshape(-1))
    sorted_rows = top_left.reshape(-1).index_select(0, order)
    bag_of = torch.div(order, per_bag, rounding_mode="floor")
    point_of = order - bag_of * per_bag
    boundaries = torch.arange(table_rows, dtype=sorted_rows.dtype, device=grad.device)
    entry_steps = steps.index_select(1, point_of)
    grad_table = None
    for index, weight in enumerate(weights):
        rows = sorted_rows if index == 0 else sorted_rows + entry_steps[index - 1]
        offsets = torch.searchsorted(rows, boundaries)
        summed = F.embedding_bag(bag_of, grad, offsets.to(bag_of.dtype), per_sample_weights=weight.reshape(-1).index_select(0, order),
                                 mode="sum")
        grad_table = summed if grad_table is None else grad_table.add_(summed)
    return grad_table


def sampling_pixels(reference_points, offsets_x, offsets_y, layout, precise):
    """Shifted pixel coordinates (x, y) [N, Lq, K] of the sampling points: (0, 0) is the
    centre of the top-left cell of the bordered map.

    Args:
        reference_points: [N, Lq, L, 2] normalised points or [N, Lq, L, 4] boxes (cx, cy, w, h).
        offsets_x, offsets_y: [N, Lq, K] raw sampling offsets (K = M * L * P).
        layout: ``SamplingLayout``; precise: the dtype to compute in (float32 or float64).
    """
    references = reference_points.to(precise)
    sizes = layout.sizes.to(precise)
    points = references.shape[-1]
    if points not in (2, 4):
        raise ValueError(f"reference points must have 2 or 4 coordinates, got {points}")
    centres = references[..., :2] * sizes + (BORDER - 0.5)  # [N, Lq, L, 2]
    pixels = []
    for axis, offsets in enumerate((offsets_x, offsets_y)):
        centre = centres[..., axis].index_select(-1, layout.level_of)  # [N, Lq, K]
        if points == 2:
            pixels.append(centre.add_(offsets.to(precise)))
        else:
            per_point = 0.5 / (layout.points_per_bag // sizes.shape[0])
            scale = (references[..., 2 + axis] * sizes[:, axis] * per_point).index_select(-1, layout.level_of)
            pixels.append(torch.addcmul(centre, offsets.to(precise), scale))
    return pixels


def bilinear_gather(table, layout, x, y, weights):
    """The attention's output [N, Lq, M * C/M] in the dtype of ``table`` (the bordered values
    [R, C/M]) for shifted pixel coordinates x, y [N, Lq, K] and attention weights [N, Lq, K];
    the corner weights are computed in the dtype of x and y, then rounded to the table's."""
    batch, queries, _ = x.shape
    bounds = layout.bounds.to(x.dtype)
    x = torch.clamp(x, min=x.new_zeros(()), max=bounds[0])
    y = torch.clamp(y, min=y.new_zeros(()), max=bounds[1])
    cells_x = x.detach().to(layout.line_steps.dtype)  # truncation: the floor of a non-negative number
    cells_y = y.detach().to(layout.line_steps.dtype)
    fx, fy = x - cells_x, y - cells_y
    top_left = (cells_y * layout.line_steps).add_(cells_x, alpha=layout.heads).add_(layout.first_rows)
    weights = weights.to(x.dtype)
    lower = weights * fy
    upper = weights - lower
    w01 = upper * fx
    w11 = lower * fx
    corners = [corner.to(table.dtype) for corner in (upper - w01, w01, lower - w11, w11)]
    per_bag = layout.points_per_bag
    line = layout.line_steps[:per_bag]
    steps = torch.stack([torch.full_like(line, layout.heads), line, line + layout.heads])
    output = CornerGather.apply(table, top_left.view(-1, per_bag), steps,
                                *(corner.reshape(-1, per_bag) for corner in corners))
    return output.view(batch, queries, -1)


def table_dtype(value_dtype, precise):
    """The gather's table dtype: at inference a 16-bit value dtype (bfloat16 under CPU
    autocast: half the memory traffic of the gathers) stays, else (and whenever autograd
    records: the backward's sparse products run in float32 or float64) the values' dtype
    promoted to ``precise``."""
    if value_dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
        return value_dtype
    return torch.promote_types(value_dtype, precise)


def gathered_deformable_attention(value, spatial_shapes, locations, weights):
    """``multi_scale_deformable_attention`` computed by ``bilinear_gather`` (see module doc).

    Args:
        value: [N, S, M, C/M]; spatial_shapes: [L, 2] (H_l, W_l) or a list of pairs;
        locations: [N, Lq, M, L, P, 2] normalised (x, y); weights: [N, Lq, M, L, P].
    Returns:
        [N, Lq, C] in the dtype of ``value``.
    """
    batch, queries, heads, _, points, _ = locations.shape
    shapes = level_pairs(spatial_shapes)
    layout = sampling_layout(shapes, batch, heads, points, value.device)
    precise = torch.promote_types(locations.dtype, torch.float32)
    sizes = layout.sizes.to(precise)[:, None, :]
    pixels = torch.addcmul(torch.full((), BORDER - 0.5, dtype=precise), locations.to(precise), sizes)
    x, y = (pixels[..., axis].reshape(batch, queries, -1) for axis in range(2))
    table = bordered_table(value, shapes, table_dtype(value.dtype, precise))
    output = bilinear_gather(table, layout, x, y, weights.reshape(batch, queries, -1))
    return output.to(value.dtype)


class FastMultiScaleDeformableAttention(MultiScaleDeformableAttention):
    """``MultiScaleDeformableAttention`` (same parameters, no state of its own) that samples
    with ``bilinear_gather`` while ``fast_sampling`` is True, on the CPU (inference and
    training); on other devices ``grid_sample`` runs unchanged."""

    fast_sampling = True

    def split_offsets(self, query):
        """query [N, Lq, C] -> the sampling offsets (x [N, Lq, K], y [N, Lq, K]): the offset
        projection with its rows reordered (all x, then all y)."""
        weight = self.sampling_offsets.weight
        weight = weight.view(-1, 2, weight.shape[-1]).transpose(0, 1).reshape(weight.shape)
        bias = self.sampling_offsets.bias.view(-1, 2).t().reshape(-1)
        offsets = F.linear(query, weight, bias)
        return offsets.chunk(2, dim=-1)

    def attention_weights_flat(self, query):
        """query [N, Lq, C] -> [N, Lq, K], softmaxed jointly over L x P per head."""
        batch, queries, _ = query.shape
        logits = self.attention_weights(query).view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        return logits.softmax(-1).view(batch, queries, -1)

    def forward(self, query, reference_points, value_input, spatial_shapes, padding_mask=None, level_shapes=None):
        if not (self.fast_sampling and value_input.device.type == "cpu"):
            return super().forward(query, reference_points, value_input, spatial_shapes, padding_mask, level_shapes)
        if padding_mask is not None and not padding_mask.any():
            padding_mask = None
        value = self.project_value(value_input, padding_mask)
        shapes = level_pairs(spatial_shapes if level_shapes is None else level_shapes)
        layout = sampling_layout(shapes, value.shape[0], self.n_heads, self.n_points, value.device)
        precise = torch.promote_types(reference_points.dtype, torch.float32)
        x, y = sampling_pixels(reference_points, *self.split_offsets(query), layout, precise)
        table = bordered_table(value, shapes, table_dtype(value.dtype, precise))
        output = bilinear_gather(table, layout, x, y, self.attention_weights_flat(query))
        return self.output_proj(output.to(value.dtype))
