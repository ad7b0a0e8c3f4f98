"""The multi-scale parts against their definitions, where the reference fixtures cannot
tell: the fixtures' sampling-offset and attention-weight projections have zero weights
(the reference's initialisation), so neither the queries nor the position encodings
change where or how strongly their attention samples. These tests pin both down."""
import math

import torch

from detr_d2.modeling.multi_scale.deformable_attention import (MultiScaleDeformableAttention,
                                                               multi_scale_deformable_attention,
                                                               sampling_locations)
from detr_d2.modeling.position_encoding import PositionEmbeddingSine


def bilinear_sample(feature, x, y):
    """feature [C, H, W] at normalised (x, y) in [0, 1] of the map (pixel centres at
    (i + 0.5) / W), zero outside: the value a point sees, one point at a time."""
    _, height, width = feature.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = torch.zeros(feature.shape[0])
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < width and 0 <= yi < height:
                total += weight * feature[:, yi, xi]
    return total


def test_attention_core_is_the_weighted_sum_of_bilinear_samples():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4)]
    batch, heads, head_dim, queries, points = 2, 2, 3, 4, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.4 - 0.2  # some outside the map
    weights = torch.rand(batch, queries, heads, len(shapes), points)
    output = multi_scale_deformable_attention(value, torch.tensor(shapes), locations, weights)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                expected = torch.zeros(head_dim)
                for level, (height, width) in enumerate(shapes):
                    level_value = value[b, starts[level]:starts[level] + height * width, m].T.reshape(head_dim, height,
                                                                                                       width)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        expected += weights[b, q, m, level, p] * bilinear_sample(level_value, x, y)
                torch.testing.assert_close(output[b, q, m * head_dim:(m + 1) * head_dim], expected, atol=1e-5,
                                           rtol=1e-5)


def test_sampling_locations_of_points_and_of_boxes():
    shapes = torch.tensor([[10, 20], [5, 10]])
    offsets = torch.randn(1, 2, 1, 2, 4, 2)
    points = torch.rand(1, 2, 2, 2)
    locations = sampling_locations(points, offsets, shapes)
    torch.testing.assert_close(locations[0, 1, 0, 1, 3], points[0, 1, 1] + offsets[0, 1, 0, 1, 3] / torch.tensor([10., 5.]))
    boxes = torch.rand(1, 2, 2, 4)
    locations = sampling_locations(boxes, offsets, shapes)
    expected = boxes[0, 1, 1, :2] + offsets[0, 1, 0, 1, 3] / 4 * boxes[0, 1, 1, 2:] * 0.5
    torch.testing.assert_close(locations[0, 1, 0, 1, 3], expected)


def test_queries_move_and_weight_the_samples():
    torch.manual_seed(1)
    attention = MultiScaleDeformableAttention(d_model=16, n_levels=2, n_heads=2, n_points=2)
    torch.nn.init.normal_(attention.sampling_offsets.weight)
    torch.nn.init.normal_(attention.attention_weights.weight)
    query = torch.randn(1, 3, 16)
    offsets, weights = attention.offsets_and_weights(query)
    assert not torch.allclose(offsets[0, 0], offsets[0, 1])
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(1, 3, 2))


def test_position_encoding_offset_shifts_the_pixel_coordinate():
    width, features = 6, 8
    mask = torch.zeros(1, 1, width, dtype=torch.bool)
    for offset in (0.0, -0.5):
        encoding = PositionEmbeddingSine(features, temperature=20, normalize=True, offset=offset)(mask)
        x_phase = (torch.arange(width) + 1 + offset) / (width + 1e-6) * 2 * math.pi
        torch.testing.assert_close(encoding[0, features, 0], x_phase.sin())  # first x channel: sin, frequency 1
        torch.testing.assert_close(encoding[0, features + 3, 0], (x_phase / 20 ** (2 / features)).cos())
