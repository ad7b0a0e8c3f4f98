"""A reference DINO checkpoint converted by tools/convert_detr_checkpoint.py and run from the
OUT.yaml it writes computes what the reference computes (fixture made by the reference
code): its top-k detections, alone and in a padded batch, and its training losses: the
matching queries' (every decoder layer, the query selection's ``_interm``) whatever the
denoising noise, the denoising queries' (``_dn``) given the reference's noised queries.
"""
import pytest
import torch
from detectron2.utils.events import EventStorage

from detr_d2.modeling.multi_scale.denoising import DenoisingQueries
from tests.helpers import chw_images
from tests.modeling.test_deformable_parity import (LOSS_TOLERANCE, assert_detections_close,
                                                   converted_deformable_fixture, detections, postprocessed,
                                                   training_inputs)

NAME = "dino_upstream_tiny"
# What no tensor holds and the fixture's reference configuration sets otherwise than
# configs/Base-DINO.yaml: its top-k (num_select) and its denoising queries (dn_number).
REFERENCE_OPTS = ("--opts", "MODEL.MULTI_SCALE.TOPK_DETECTIONS", "20", "MODEL.DINO.DN_NUMBER", "10")
DENOISING = "_dn"


def converted_dino_fixture(converted_reference):
    """(config, model in eval mode, inputs, expected, converter output) of the fixture
    converted once per session by the converter CLI, run from its OUT.yaml."""
    return converted_deformable_fixture(converted_reference, NAME, *REFERENCE_OPTS)


@pytest.fixture(scope="module")
def dino(converted_reference):
    return converted_dino_fixture(converted_reference)


@pytest.mark.parametrize("index", [0, 1])
def test_single_image_detections_equal_the_reference(dino, index):
    _, model, inputs, expected, _ = dino
    image = chw_images(inputs)[index]
    reference = postprocessed(expected["single"][index]["postprocessed"])
    assert len(reference["scores"]) == 20
    assert_detections_close(detections(model, [image])[0], reference, image)


def test_padded_batch_detections_equal_the_reference(dino):
    _, model, inputs, expected, _ = dino
    images = chw_images(inputs)
    assert images[0].shape != images[1].shape  # the batch is padded
    for instances, reference, image in zip(detections(model, images), expected["batched"]["postprocessed"], images):
        assert_detections_close(instances, reference, image)


def reference_losses(expected):
    """(unweighted losses, weights) of the reference criterion in the fixture's training step."""
    return expected["train_batched"]["losses_unweighted"], expected["train_batched"]["weight_dict"]


def test_matching_losses_equal_the_reference_whatever_the_denoising_noise(dino):
    """A training step as it runs (the model draws its own denoising queries): every loss and
    logged value of the matching queries and the proposals is the reference's; the
    denoising ones exist (their values depend on the noise)."""
    _, model, inputs, expected, _ = dino
    unweighted, weights = reference_losses(expected)
    assert model.criterion.weight_dict == weights
    model.train()
    try:
        with EventStorage() as storage:
            torch.manual_seed(1)
            losses = model(training_inputs(inputs))
    finally:
        model.eval()
    assert set(losses) == {key for key in unweighted if key in weights}
    logged = {key for key in unweighted if key not in weights}
    assert {"class_error", "cardinality_error_interm", "loss_xy_0", "loss_hw_interm"} <= logged
    matching = [key for key in unweighted if DENOISING not in key]
    assert len(matching) == 3 * 6 + 1  # per decoder layer and the proposals 5 losses and cardinality_error; class_error
    for key in matching:
        value = (losses[key] / weights[key]).item() if key in weights else storage.latest()[key][0]
        assert value == pytest.approx(float(unweighted[key]), abs=LOSS_TOLERANCE), key
    assert all(torch.isfinite(losses[key]) for key in losses if DENOISING in key)


def fixture_denoising(expected):
    """The reference's prepare_for_cdn outputs of the fixture's training step as detr_d2's
    ``DenoisingQueries``."""
    dn = expected["train_batched"]["dn"]
    meta = dn["dn_meta"]
    return DenoisingQueries(dn["input_query_label"], dn["input_query_bbox"], dn["attn_mask"], meta["num_dn_group"],
                            meta["pad_size"])


def test_every_loss_equals_the_reference_given_its_denoising_queries(dino):
    """The reference's noised queries through ``predict``'s denoising hook: every value of the
    reference criterion (matching, ``_interm``, ``_dn`` of every layer), unweighted."""
    _, model, inputs, expected, _ = dino
    unweighted, _ = reference_losses(expected)
    batch = training_inputs(inputs)
    model.train()
    try:
        images = model.preprocess_image(batch)
        targets = model.prepare_targets(batch, images.image_sizes)
        logits, boxes, extras = model.predict(images, fixture_denoising(expected))
        losses = model.criterion(logits, boxes, targets, extras)
    finally:
        model.eval()
    assert set(losses) == set(unweighted)
    assert len([key for key in losses if DENOISING in key]) == 2 * 6  # per decoder layer
    for key, value in losses.items():
        assert value.item() == pytest.approx(float(unweighted[key]), abs=LOSS_TOLERANCE), key
    reference_dn = expected["train_batched"]["dn"]["dn_meta"]["output_known_lbs_bboxes"]
    torch.testing.assert_close(extras.dn_logits[-1], reference_dn["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(extras.dn_boxes[-1], reference_dn["pred_boxes"], atol=1e-5, rtol=0)
