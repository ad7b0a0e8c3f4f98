"""ExportableDetr: DETR's inference on tensors, the padding mask computed from the sizes;
the verification's sizes and its pairing of top-k detections."""
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, ImageList, Instances

from detr_d2.acceleration import set_fast_paths
from detr_d2.engine.build import build_model
from detr_d2.export import ExportableDetr
from detr_d2.export.verification import paired_topk_differences, verification_sizes
from detr_d2.modeling.backbone import pixel_padding_mask
from detr_d2_deploy.detections import Detections
from tests.helpers import tiny_cfg

SIZES = [(75, 101), (93, 59), (64, 120)]  # none a multiple of 32, both orientations


def test_padding_mask_from_a_size_tensor_equals_the_one_from_a_size_list():
    from_list = pixel_padding_mask(SIZES, (93, 120), "cpu")
    from_tensor = pixel_padding_mask(torch.tensor(SIZES), (93, 120), "cpu")
    assert torch.equal(from_list, from_tensor)
    for mask, (height, width) in zip(from_list, SIZES):
        assert not mask[:height, :width].any() and mask[height:].all() and mask[:, width:].all()


def test_adapter_returns_what_predict_returns_on_a_padded_batch():
    torch.manual_seed(0)
    model = set_fast_paths(build_model(tiny_cfg()), False).eval()
    images = [torch.randn(3, h, w) for h, w in SIZES]
    batch = ImageList.from_tensors(images)
    with torch.no_grad():
        logits, boxes = model.predict(batch)
        adapted_logits, adapted_boxes = ExportableDetr(model)(batch.tensor, torch.tensor(SIZES))
    assert torch.equal(adapted_logits, logits[-1]) and torch.equal(adapted_boxes, boxes[-1])
    assert adapted_logits.shape == (3, 10, 81) and adapted_boxes.shape == (3, 10, 4)


def test_verification_sizes_avoid_the_stride_and_cover_both_orientations():
    for shortest_edge in (0, 128, 800):
        sizes = verification_sizes(shortest_edge)
        assert len(set(sizes)) == 3
        assert all(h % 32 and w % 32 for h, w in sizes)
        assert any(h < w for h, w in sizes) and any(h > w for h, w in sizes)
        assert np.all(np.array(sizes) > 32)


def topk_instances(boxes, scores, labels):
    return Instances((100, 200), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                     scores=torch.tensor(scores), pred_classes=torch.tensor(labels))


def test_topk_verification_pairs_near_ties_and_the_last_rank_but_not_other_changes():
    boxes = [[10, 10, 50, 40], [60, 20, 90, 80], [0, 0, 20, 20], [5, 50, 30, 90]]
    eager = topk_instances(boxes, [0.9, 0.50001, 0.5, 0.2], [3, 1, 1, 7])
    image = np.zeros((100, 200, 3), np.uint8)
    swapped = Detections(np.array(boxes, np.float32)[[0, 2, 1, 3]], np.array([0.9, 0.50001, 0.5, 0.2], np.float32),
                         np.array([3, 1, 1, 7]))  # ranks 2 and 3 traded (scores 1e-5 apart)
    box, score, mismatches = paired_topk_differences(eager, swapped, image)
    assert mismatches == 0 and box < 1e-7 and score < 2e-5
    last_dropped = Detections(np.array(boxes[:3] + [[1, 1, 9, 9]], np.float32),
                              np.array([0.9, 0.50001, 0.5, 0.19999], np.float32), np.array([3, 1, 1, 2]))
    assert paired_topk_differences(eager, last_dropped, image)[2] == 0  # the k-th pair may fall out
    relabelled = Detections(np.array(boxes, np.float32), np.array([0.9, 0.50001, 0.5, 0.2], np.float32),
                            np.array([3, 2, 1, 7]))
    assert paired_topk_differences(eager, relabelled, image)[2] == 1
    moved = Detections(np.array(boxes, np.float32) + [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.5], [0, 0, 0, 0]],
                       np.array([0.9, 0.50001, 0.5, 0.2], np.float32), np.array([3, 1, 1, 7]))
    box, _, mismatches = paired_topk_differences(eager, moved, image)
    assert mismatches == 1 and box == pytest.approx(0.005)
