"""Reference Deformable DETR checkpoints converted by tools/convert_detr_checkpoint.py and
run from the OUT.yaml it writes compute what the reference computes (fixtures made by the
reference code): its top-k detections, alone and in a padded batch, and its training losses.

A 91-output COCO head converted to 80 classes gives the reference's detections over the
COCO columns of its head; with --keep-classes every output and loss is the reference's.
"""
import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from detr_d2.checkpoint.convert import COCO_CATEGORY_IDS
from detr_d2.engine import build_config
from detr_d2.utils.predictor import build_inference_model
from tests.helpers import chw_images, fixture_dir

TINY = "deformable_upstream_tiny"
TWO_STAGE = "deformable_upstream_two_stage_coco"
# The fixtures' reference configuration says what no tensor holds: dropout 0 (the losses
# are computed in training mode) and, for the two-stage model, 30 proposals.
REFERENCE_OPTS = ("--opts", "MODEL.DETR.DROPOUT", "0.0")
TWO_STAGE_OPTS = REFERENCE_OPTS + ("MODEL.DETR.NUM_OBJECT_QUERIES", "30")
SCORE_TOLERANCE = 1e-5
BOX_TOLERANCE = 1e-4  # of the image side
LOSS_TOLERANCE = 1e-5


def converted_deformable_fixture(converted_reference, name, *converter_args):
    """(config, model in eval mode, inputs, expected, converter output) of a fixture
    converted by tools/convert_detr_checkpoint.py (conftest.py's ``converted_reference``):
    the config is the OUT.yaml it wrote, built by detr_d2's config building as the tools
    build it (on the CPU), the model built and OUT.pth loaded as the tools do (fast paths as
    configured)."""
    path = fixture_dir(name)
    output, result = converted_reference(name, *converter_args)
    cfg = build_config(str(output.with_suffix(".yaml")), ["MODEL.DEVICE", "cpu"], all_datasets_registered=False)
    model = build_inference_model(cfg)
    inputs = torch.load(path / "inputs.pt", weights_only=True)
    expected = torch.load(path / "expected.pt", weights_only=True)
    return cfg, model, inputs, expected, result.stdout


@pytest.fixture(scope="module")
def tiny(converted_reference):
    return converted_deformable_fixture(converted_reference, TINY, *REFERENCE_OPTS)


@pytest.fixture(scope="module")
def two_stage_91(converted_reference):
    return converted_deformable_fixture(converted_reference, TWO_STAGE, "--keep-classes", *TWO_STAGE_OPTS)


@pytest.fixture(scope="module")
def two_stage_80(converted_reference):
    return converted_deformable_fixture(converted_reference, TWO_STAGE, *TWO_STAGE_OPTS)


@pytest.fixture(params=["tiny", "two_stage_91"])
def unchanged_heads(request):
    """The conversions whose class heads are the reference's."""
    return request.getfixturevalue(request.param)


def detections(model, images):
    with torch.no_grad():
        return [out["instances"] for out in model([{"image": im, "height": im.shape[1], "width": im.shape[2]}
                                                   for im in images])]


def postprocessed(entry):
    """The reference PostProcess output of one image (a list of one for single images)."""
    return entry[0] if isinstance(entry, list) else entry


def assert_detections_close(instances, reference, image):
    """Labels equal, scores within SCORE_TOLERANCE, boxes within BOX_TOLERANCE of the image
    side (the reference's boxes clipped to the image, as detectron2's are)."""
    height, width = image.shape[1:]
    boxes = Boxes(reference["boxes"])
    boxes.clip((height, width))
    boxes = boxes.tensor
    assert len(instances) == len(reference["scores"])
    assert torch.equal(instances.pred_classes, reference["labels"])
    torch.testing.assert_close(instances.scores, reference["scores"], atol=SCORE_TOLERANCE, rtol=0)
    torch.testing.assert_close(instances.pred_boxes.tensor, boxes, atol=BOX_TOLERANCE * max(height, width), rtol=0)


@pytest.mark.parametrize("index", [0, 1])
def test_single_image_detections_equal_the_reference(unchanged_heads, index):
    _, model, inputs, expected, _ = unchanged_heads
    image = chw_images(inputs)[index]
    reference = postprocessed(expected["single"][index]["postprocessed"])
    assert_detections_close(detections(model, [image])[0], reference, image)


def test_padded_batch_detections_equal_the_reference(unchanged_heads):
    _, model, inputs, expected, _ = unchanged_heads
    images = chw_images(inputs)
    assert images[0].shape != images[1].shape  # the batch is padded
    for instances, reference, image in zip(detections(model, images), expected["batched"]["postprocessed"], images):
        assert_detections_close(instances, reference, image)


def training_inputs(inputs):
    """The fixture's images with their targets (cxcywh normalised) as detectron2 instances."""
    batch = []
    for image, target in zip(chw_images(inputs), inputs["targets_cxcywh"]):
        height, width = image.shape[1:]
        cx, cy, w, h = (target["boxes"] * torch.tensor([width, height, width, height])).unbind(-1)
        instances = Instances((height, width), gt_boxes=Boxes(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2,
                                                                           cy + h / 2], -1)),
                              gt_classes=target["labels"])
        batch.append({"image": image, "instances": instances})
    return batch


def test_training_losses_equal_the_reference(unchanged_heads):
    """Every weighted loss (each decoder layer, two-stage proposals ``_enc``) and every
    logged value (class_error, cardinality_error) of the reference criterion."""
    _, model, inputs, expected, _ = unchanged_heads
    reference = expected["train_batched"]
    unweighted, weights = reference["losses_unweighted"], reference["weight_dict"]
    model.train()
    try:
        with EventStorage() as storage:
            losses = model(training_inputs(inputs))
    finally:
        model.eval()
    # the reference's weight_dict also names _enc losses of models without proposals
    assert all(weights[key] == value for key, value in model.criterion.weight_dict.items())
    assert set(losses) == {key for key in unweighted if key in weights}
    for key, value in losses.items():
        torch.testing.assert_close(value, unweighted[key] * weights[key], atol=LOSS_TOLERANCE, rtol=0, msg=key)
    logged = {key: unweighted[key] for key in unweighted if key not in weights}
    assert any(key.startswith("cardinality_error") for key in logged) and "class_error" in logged
    for key, value in logged.items():
        assert storage.latest()[key][0] == pytest.approx(float(value), abs=LOSS_TOLERANCE), key


# ---------------------------------------------------------------- the 91-output head as 80 COCO classes
DECODER_HEAD_ROWS = list(COCO_CATEGORY_IDS)
PROPOSAL_HEAD_ROWS = [0] + list(COCO_CATEGORY_IDS[1:])


def reference_detections_at_coco_columns(outputs, height, width, k=100):
    """The reference's top-k over queries x its COCO columns (sigmoid probabilities), boxes
    xyxy in pixels: what it detects once the 11 unused category ids are left out."""
    probabilities = outputs["pred_logits"][0][:, DECODER_HEAD_ROWS].sigmoid()
    scores, index = probabilities.flatten().topk(k)
    cx, cy, w, h = outputs["pred_boxes"][0][index // len(DECODER_HEAD_ROWS)].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([width, height] * 2)
    return {"scores": scores, "labels": index % len(DECODER_HEAD_ROWS), "boxes": boxes}


def batch_entry(outputs, index):
    return {key: outputs[key][index:index + 1] for key in ("pred_logits", "pred_boxes")}


@pytest.mark.parametrize("index", [0, 1])
def test_coco_classes_detect_what_the_reference_detects_at_its_coco_columns(two_stage_80, index):
    cfg, model, inputs, expected, _ = two_stage_80
    assert cfg.MODEL.DETR.NUM_CLASSES == 80
    image = chw_images(inputs)[index]
    reference = reference_detections_at_coco_columns(expected["single"][index]["outputs"], *image.shape[1:])
    assert_detections_close(detections(model, [image])[0], reference, image)


def test_coco_classes_padded_batch_detections(two_stage_80):
    _, model, inputs, expected, _ = two_stage_80
    images = chw_images(inputs)
    outputs = expected["batched"]["outputs"]
    for index, (instances, image) in enumerate(zip(detections(model, images), images)):
        reference = reference_detections_at_coco_columns(batch_entry(outputs, index), *image.shape[1:])
        assert_detections_close(instances, reference, image)


def test_coco_classes_raw_outputs_and_proposals_equal_the_reference(two_stage_80):
    """Every decoder layer's logits at the COCO columns and boxes; the encoder proposals'
    logits at the proposal head's rows (class-agnostic output 0 first) and boxes: the same
    proposals are picked."""
    _, model, inputs, expected, _ = two_stage_80
    with torch.no_grad():
        logits, boxes, (enc_logits, enc_boxes) = model.predict(model.preprocess_image(
            [{"image": image} for image in chw_images(inputs)]))
    reference = expected["batched"]["outputs"]
    layers = [*reference["aux_outputs"], reference]
    assert len(logits) == len(layers)
    for layer, outputs in enumerate(layers):
        torch.testing.assert_close(logits[layer], outputs["pred_logits"][..., DECODER_HEAD_ROWS], atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes[layer], outputs["pred_boxes"], atol=1e-5, rtol=0)
    proposals = reference["enc_outputs"]
    torch.testing.assert_close(enc_logits, proposals["pred_logits"][..., PROPOSAL_HEAD_ROWS], atol=1e-4, rtol=0)
    torch.testing.assert_close(enc_boxes, proposals["pred_boxes"], atol=1e-5, rtol=0)
