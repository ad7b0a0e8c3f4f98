"""detr_d2 reproduces the reference DETR numerically (fixtures made by the reference code).

Each model is converted by tools/convert_detr_checkpoint.py and built from a config.
"""
import pytest
import torch

from detr_d2.checkpoint.convert import COCO_HEAD_ROWS
from tests.helpers import chw_images, converted_fixture_model

TINY = "detr_upstream_tiny"
DC5 = "detr_upstream_r50dc5_coco92"


@pytest.fixture(scope="module")
def tiny(converted_reference):
    return converted_fixture_model(TINY, converted_reference)


@pytest.fixture(scope="module")
def dc5(converted_reference):
    return converted_fixture_model(DC5, converted_reference)


def raw_outputs(model, images):
    with torch.no_grad():
        return model.predict(model.preprocess_image([{"image": image} for image in images]))


def detections(model, images):
    with torch.no_grad():
        return [out["instances"] for out in model([{"image": im, "height": im.shape[1], "width": im.shape[2]}
                                                   for im in images])]


def targets_of(inputs):
    return [{"labels": t["labels"], "boxes": t["boxes"]} for t in inputs["targets_cxcywh_normalized"]]


def clipped_reference_boxes(boxes, image):
    height, width = image.shape[1:]
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), scale)


def assert_detections_close(instances, scores, labels, boxes, image):
    torch.testing.assert_close(instances.scores, scores, atol=1e-4, rtol=0)
    assert torch.equal(instances.pred_classes, labels)
    torch.testing.assert_close(instances.pred_boxes.tensor, clipped_reference_boxes(boxes, image), atol=1e-4, rtol=0)


def assert_losses_close(ours, reference):
    assert set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("index", [0, 1])
def test_tiny_single_image_outputs(tiny, index):
    model, inputs, expected = tiny
    image = chw_images(inputs)[index]
    reference = expected["single"][index]
    logits, boxes = raw_outputs(model, [image])
    torch.testing.assert_close(logits[-1, 0], reference["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes[-1, 0], reference["pred_boxes"], atol=1e-5, rtol=0)
    for layer, (aux_logits, aux_boxes) in enumerate(zip(reference["aux_pred_logits"], reference["aux_pred_boxes"])):
        torch.testing.assert_close(logits[layer, 0], aux_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(boxes[layer, 0], aux_boxes, atol=1e-5, rtol=0)
    losses = model.criterion(logits, boxes, targets_of(inputs)[index:index + 1])
    assert_losses_close(losses, reference["losses_unweighted"])
    det = reference["detections"]
    assert_detections_close(detections(model, [image])[0], det["scores"], det["labels"], det["boxes"], image)


def test_tiny_padded_batch_outputs(tiny):
    model, inputs, expected = tiny
    images = chw_images(inputs)
    reference = expected["batched"]
    logits, boxes = raw_outputs(model, images)
    torch.testing.assert_close(logits[-1], reference["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes[-1], reference["pred_boxes"], atol=1e-5, rtol=0)
    assert_losses_close(model.criterion(logits, boxes, targets_of(inputs)), reference["losses_unweighted"])
    for instances, det, image in zip(detections(model, images), reference["detections"], images):
        assert_detections_close(instances, det["scores"], det["labels"], det["boxes"], image)


def remapped_reference_detections(logits_92, boxes_xyxy):
    """The reference logits at detectron2's COCO columns, then the same softmax/max."""
    scores, labels = logits_92[..., list(COCO_HEAD_ROWS)].softmax(-1)[..., :-1].max(-1)
    return scores, labels, boxes_xyxy


@pytest.mark.parametrize("index", [0, 1])
def test_dc5_coco_single_image_detections(dc5, index):
    model, inputs, expected = dc5
    image = chw_images(inputs)[index]
    reference = expected["single"][index]
    scores, labels, boxes = remapped_reference_detections(reference["pred_logits"], reference["detections"]["boxes"])
    assert_detections_close(detections(model, [image])[0], scores, labels, boxes, image)


def test_dc5_coco_batched_detections(dc5):
    model, inputs, expected = dc5
    images = chw_images(inputs)
    reference = expected["batched"]
    for i, (instances, image) in enumerate(zip(detections(model, images), images)):
        scores, labels, boxes = remapped_reference_detections(reference["pred_logits"][i],
                                                              reference["detections"][i]["boxes"])
        assert_detections_close(instances, scores, labels, boxes, image)


def test_dc5_logits_equal_reference_at_coco_columns(dc5):
    model, inputs, expected = dc5
    logits, boxes = raw_outputs(model, chw_images(inputs)[:1])
    reference = expected["single"][0]
    torch.testing.assert_close(logits[-1, 0], reference["pred_logits"][:, list(COCO_HEAD_ROWS)], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[-1, 0], reference["pred_boxes"], atol=1e-5, rtol=0)
