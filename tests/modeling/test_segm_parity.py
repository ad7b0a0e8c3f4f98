"""The mask head, mask losses and PostProcessSegm reproduce the reference DETRsegm
(fixture ../shared/fixtures/detr_upstream_segm_tiny, made by the reference code).

The model is converted by tools/convert_detr_checkpoint.py and built from a MODEL.MASK_ON
config.

Tolerance of the mask logits: the fixture scales the attention-map input of the mask head
by 3000 (its README), which magnifies float32 rounding beyond the issue's 1e-4. The
reference's own code, rerun on this machine on the fixture's checkpoint and images (torch
2.14, CPU), reproduces the fixture's mask logits only within 2.2e-5 / 1.1e-4 (single
images) and 1.6e-4 (padded batch) with one thread, 1.5e-5 / 1.4e-4 / 1.8e-4 with two.
detr_d2 differs from the fixture by 8.3e-5 / 1.1e-4 / 2.3e-4 and from that rerun by
6.1e-5 / 1.0e-4 / 2.0e-4 (one thread); the differences enter before the mask head (res5
features 7e-6, last decoder layer 1.7e-5): fed the reference's own decoder output, memory
and backbone levels, detr_d2's mask head is within 1.2e-5 of the reference's. On an AMD
EPYC (Zen 4, AVX-512; other float kernels) detr_d2 differs from the fixture by 4.4e-5 /
1.1e-4 / 4.6e-4, with 0 / 0.02 / 2.1 % of the padded batch's values beyond 1e-4 (the
mask logits themselves reach 2.7-3.1 in magnitude). On an Intel Xeon (AMX), through the
reference detectron2 wrapper's checkpoint, 5.19 % of the values were beyond 1e-4
(2026-12-05). The test allows 1e-3 and requires fewer than 8 % of the values beyond 1e-4.
The same magnified rounding reaches the losses: on an AMD EPYC (2026-12-06) the padded
batch's class logits are within 8.0e-5 of the fixture's and its loss_ce (3.276) 1.17e-5
off, so losses are compared within 1e-5 plus 1e-5 of their value.
"""
import pytest
import torch
import torch.nn.functional as F

from detr_d2.modeling.postprocess import binary_masks
from tests.helpers import chw_images, converted_fixture_model

SEGM = "detr_upstream_segm_tiny"
MASK_LOGIT_TOLERANCE = 1e-3
BEYOND_1E4_FRACTION = 0.08
NEAR_THRESHOLD = 1e-4
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def segm(converted_reference):
    return converted_fixture_model(SEGM, converted_reference)


def mask_predictions(model, images):
    with torch.no_grad():
        return model.predict_with_masks(model.preprocess_image([{"image": image} for image in images]))


def assert_losses_close(ours, reference):
    assert set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=LOSS_RTOL, msg=key)


def assert_mask_logits_close(ours, reference):
    difference = (ours - reference).abs()
    assert difference.max() <= MASK_LOGIT_TOLERANCE, difference.max()
    assert (difference > 1e-4).float().mean() < BEYOND_1E4_FRACTION


def reference_probabilities(mask_logits, padded_size, image_size, output_size):
    """The reference's sigmoid of the upsampled mask logits [Q, h, w], cropped and
    nearest-resized to the output size as PostProcessSegm does with its masks."""
    upsampled = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    height, width = image_size
    cropped = upsampled.sigmoid()[:, :height, :width]
    return F.interpolate(cropped[None], size=output_size, mode="nearest")[0]


def assert_masks_equal_off_threshold(pred_masks, reference_masks, probabilities):
    """Equal masks except where the reference's probability is within NEAR_THRESHOLD of 0.5;
    returns the number of pixels that differ."""
    differ = pred_masks != reference_masks
    near = (probabilities - 0.5).abs() < NEAR_THRESHOLD
    assert not (differ & ~near).any(), int((differ & ~near).sum())
    return int(differ.sum())


def segm_inputs(images, sizes):
    return [{"image": image, "height": h, "width": w} for image, (h, w) in zip(images, sizes)]


def test_converted_segm_checkpoint_builds_the_mask_head(segm):
    model, _, _ = segm
    assert model.mask_head is not None
    names = set(model.state_dict())
    assert any(name.startswith("mask_head.attention_map.") for name in names)
    assert any(name.startswith("mask_head.fpn.adapter3.") for name in names)


@pytest.mark.parametrize("index", [0, 1])
def test_single_image_mask_logits_and_losses(segm, index):
    model, inputs, expected = segm
    reference = expected["single"][index]
    logits, boxes, mask_logits = mask_predictions(model, chw_images(inputs)[index:index + 1])
    torch.testing.assert_close(logits[-1, 0], reference["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[-1, 0], reference["pred_boxes"], atol=1e-5, rtol=0)
    assert mask_logits.shape[1:] == reference["pred_masks"].shape
    assert_mask_logits_close(mask_logits[0], reference["pred_masks"])
    losses = model.criterion(logits, boxes, inputs["targets"][index:index + 1], mask_logits)
    assert_losses_close(losses, reference["losses_unweighted"])


def test_padded_batch_mask_logits_and_losses(segm):
    model, inputs, expected = segm
    reference = expected["batched"]
    logits, boxes, mask_logits = mask_predictions(model, chw_images(inputs))
    torch.testing.assert_close(logits[-1], reference["pred_logits"], atol=1e-4, rtol=0)
    assert_mask_logits_close(mask_logits, reference["pred_masks"])
    assert_losses_close(model.criterion(logits, boxes, inputs["targets"], mask_logits),
                        reference["losses_unweighted"])


def test_binary_masks_is_postprocess_segm_on_reference_logits(segm):
    """The formula alone: applied to the reference's own mask logits it gives the
    reference's masks exactly, for single images and for the padded batch."""
    _, inputs, expected = segm
    sizes, orig_sizes = inputs["processed_sizes"], inputs["orig_sizes"]
    for index in (0, 1):
        masks = binary_masks(expected["single"][index]["pred_masks"], sizes[index], sizes[index], orig_sizes[index])
        assert torch.equal(masks, expected["single"][index]["segm"]["masks"][:, 0].bool())
    padded = [max(s[d] for s in sizes) for d in (0, 1)]
    for index in (0, 1):
        masks = binary_masks(expected["batched"]["pred_masks"][index], padded, sizes[index], orig_sizes[index])
        assert torch.equal(masks, expected["batched"]["segm"][index]["masks"][:, 0].bool())


def test_pred_masks_equal_reference_segm_off_threshold(segm):
    """Instances' pred_masks from the model (bool [Q, orig H, orig W]) equal the reference's
    PostProcessSegm masks except within 1e-4 of the 0.5 threshold (counted)."""
    model, inputs, expected = segm
    images, sizes, orig_sizes = chw_images(inputs), inputs["processed_sizes"], inputs["orig_sizes"]
    differing = []
    cases = [([i], expected["single"][i]["pred_masks"][None], [expected["single"][i]["segm"]]) for i in (0, 1)]
    cases.append(([0, 1], expected["batched"]["pred_masks"], expected["batched"]["segm"]))
    for indices, reference_logits, reference_segm in cases:
        with torch.no_grad():
            outputs = model(segm_inputs([images[i] for i in indices], [orig_sizes[i] for i in indices]))
        padded = [max(sizes[i][d] for i in indices) for d in (0, 1)]
        for output, i, logits, segm_result in zip(outputs, indices, reference_logits, reference_segm):
            pred_masks = output["instances"].pred_masks
            assert pred_masks.dtype == torch.bool and pred_masks.shape == (10, *orig_sizes[i])
            probabilities = reference_probabilities(logits, padded, sizes[i], orig_sizes[i])
            differing.append(assert_masks_equal_off_threshold(pred_masks, segm_result["masks"][:, 0].bool(),
                                                              probabilities))
            torch.testing.assert_close(output["instances"].pred_boxes.tensor,
                                       clipped(segm_result["boxes"], orig_sizes[i]), atol=1e-3, rtol=0)
    print("pixels differing at the threshold (single 0, single 1, batched 0, batched 1):", differing)


def clipped(boxes, size):
    height, width = size
    return torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=boxes.dtype))
