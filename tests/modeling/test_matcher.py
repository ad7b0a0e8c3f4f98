"""HungarianMatcher against brute force on small cases, and its edge cases."""
import itertools

import pytest
import torch

from detr_d2.modeling.matcher import HungarianMatcher


def random_case(generator, num_queries, sizes, num_classes=3, layers=1):
    logits = torch.randn(layers, len(sizes), num_queries, num_classes + 1, generator=generator)
    centers = torch.rand(layers, len(sizes), num_queries, 2, generator=generator) * 0.6 + 0.2
    extents = torch.rand(layers, len(sizes), num_queries, 2, generator=generator) * 0.3 + 0.05
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=generator),
                "boxes": torch.cat([torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=generator) * 0.3 + 0.05], dim=1)}
               for n in sizes]
    return logits, torch.cat([centers, extents], dim=-1), targets


def brute_force_cost(costs):
    """Minimum total cost over all injective assignments of targets (columns) to queries."""
    num_queries, num_targets = costs.shape
    return min(sum(costs[q, t] for t, q in enumerate(perm))
               for perm in itertools.permutations(range(num_queries), num_targets))


@pytest.mark.parametrize("seed", range(5))
def test_matching_is_optimal_against_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    sizes = [3, 0, 2]
    logits, boxes, targets = random_case(generator, num_queries=5, sizes=sizes)
    costs = matcher.cost_matrices(logits, boxes, targets).view(1, len(sizes), 5, -1)[0]
    matches = matcher(logits, boxes, targets)[0]
    start = 0
    for image, (size, (rows, cols)) in enumerate(zip(sizes, matches)):
        image_costs = costs[image, :, start:start + size]
        assert len(rows) == len(cols) == size
        assert len(set(rows.tolist())) == size
        if size:
            assert image_costs[rows, cols].sum().item() == pytest.approx(brute_force_cost(image_costs).item(), abs=1e-5)
        start += size


def test_cost_matrix_terms_follow_the_reference_definition():
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    logits = torch.tensor([[[[2.0, 0.0, 0.0]]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    boxes = torch.tensor([[[[0.4, 0.5, 0.2, 0.2]]]])
    expected_class = -logits.softmax(-1)[0, 0, 0, 1]
    assert matcher.cost_matrices(logits, boxes, targets).item() == pytest.approx(expected_class.item())
    l1_only = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    assert l1_only.cost_matrices(logits, boxes, targets).item() == pytest.approx(0.1)
    giou_only = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)
    # boxes [0.3,0.4,0.5,0.6] and [0.4,0.4,0.6,0.6]: IoU 0.01/0.07, hull = union -> GIoU = IoU.
    assert giou_only.cost_matrices(logits, boxes, targets).item() == pytest.approx(-1 / 3, abs=1e-6)


def test_all_layers_are_matched_independently():
    generator = torch.Generator().manual_seed(7)
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    logits, boxes, targets = random_case(generator, num_queries=6, sizes=[2, 4], layers=3)
    together = matcher(logits, boxes, targets)
    for layer in range(3):
        alone = matcher(logits[layer:layer + 1], boxes[layer:layer + 1], targets)[0]
        for (rows_a, cols_a), (rows_b, cols_b) in zip(together[layer], alone):
            assert torch.equal(rows_a, rows_b) and torch.equal(cols_a, cols_b)


def test_empty_targets_give_empty_matches():
    generator = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    logits, boxes, targets = random_case(generator, num_queries=4, sizes=[0, 0], layers=2)
    matches = matcher(logits, boxes, targets)
    assert len(matches) == 2 and all(len(r) == 0 and len(c) == 0 for layer in matches for r, c in layer)


def test_all_zero_costs_are_rejected():
    with pytest.raises(ValueError, match="COST_CLASS"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
