"""ExportableDetr: DETR's inference on tensors, the padding mask computed from the sizes."""
import numpy as np
import torch
from detectron2.structures import ImageList

from detr_d2.acceleration import set_fast_paths
from detr_d2.engine.build import build_model
from detr_d2.export import ExportableDetr
from detr_d2.export.verification import verification_sizes
from detr_d2.modeling.backbone import pixel_padding_mask
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
