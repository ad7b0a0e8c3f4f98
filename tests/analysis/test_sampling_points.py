"""detr_d2.analysis.sampling_points on small random-weight DeformableDetr and Dino models
(configs/tests/tiny_deformable.yaml: 4 levels of strides 8-64, 4 heads, 2 points, 10
queries, top-20 detections) and a padded batch of two images."""
import pytest
import torch

import detr_d2  # noqa: F401  (first: compat fixes, registers the models)
from detr_d2.analysis import detection_queries, detections_with_sampling, feature_level_count, record_sampling
from detr_d2.engine.build import build_model
from detr_d2.errors import SetupError
from detr_d2.modeling.multi_scale.deformable_attention import multi_scale_deformable_attention, sampling_locations
from tests.helpers import config

HEADS, LEVELS, POINTS, QUERIES, TOPK = 4, 4, 2, 10, 20
ARCHITECTURES = {
    "plain": ("MODEL.META_ARCHITECTURE", "DeformableDetr"),
    "refine_two_stage": ("MODEL.META_ARCHITECTURE", "DeformableDetr", "MODEL.MULTI_SCALE.WITH_BOX_REFINE", "True",
                         "MODEL.MULTI_SCALE.TWO_STAGE", "True"),
    "dino": ("MODEL.META_ARCHITECTURE", "Dino"),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model(request):
    torch.manual_seed(0)
    return build_model(config("tests/tiny_deformable.yaml", *ARCHITECTURES[request.param])).eval()


def _inputs():
    """A 128x96 (HxW) image drawn at 256x192 and a 100x128 one at its own size: padded to
    128x128 in the batch, one at the right and one at the bottom."""
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 128, 96), dtype=torch.uint8, generator=generator),
             "height": 256, "width": 192},
            {"image": torch.randint(0, 256, (3, 100, 128), dtype=torch.uint8, generator=generator),
             "height": 100, "width": 128}]


def _calls_of(module):
    """A forward hook keeping every call's arguments and output, and the list it fills."""
    calls = []

    def hook(_, args, kwargs, output):
        calls.append((args, kwargs, output))

    return module.register_forward_hook(hook, with_kwargs=True), calls


def _detections(model, inputs):
    with torch.no_grad():
        return [output["instances"] for output in model(inputs)]


def test_recorded_points_and_weights_are_those_the_attention_computed(model):
    """For the last decoder layer's cross-attention and the last encoder layer's
    self-attention: recomputing offsets_and_weights + sampling_locations from the inputs
    of the call gives the recorded tensors exactly, and sampling the call's values at the
    recorded locations with the recorded weights gives the call's output."""
    transformer = model.transformer
    attentions = {"decoder": transformer.decoder.layers[-1].cross_attn,
                  "encoder": transformer.encoder.layers[-1].self_attn}
    watched = {part: _calls_of(attention) for part, attention in attentions.items()}
    try:
        with torch.no_grad(), record_sampling(model) as recording:
            model(_inputs())
    finally:
        for handle, _ in watched.values():
            handle.remove()
    for part, attention in attentions.items():
        [(args, kwargs, output)] = watched[part][1]
        query, reference_points, value_input, spatial_shapes, padding_mask = args[:5]
        recorded = recording[part]
        with torch.no_grad():
            offsets, weights = attention.offsets_and_weights(query)
            assert torch.equal(recorded.locations, sampling_locations(reference_points, offsets, spatial_shapes))
            assert torch.equal(recorded.weights, weights)
            value = attention.project_value(value_input, padding_mask)
            resampled = attention.output_proj(multi_scale_deformable_attention(
                value, spatial_shapes, recorded.locations, recorded.weights))
        torch.testing.assert_close(resampled, output, rtol=0, atol=1e-6)
        queries = QUERIES if part == "decoder" else int(spatial_shapes.prod(-1).sum())
        assert recorded.locations.shape == (2, queries, HEADS, LEVELS, POINTS, 2)
        torch.testing.assert_close(recorded.weights.sum((-2, -1)), torch.ones(2, queries, HEADS))
        assert torch.equal(recorded.reference_points, reference_points)


def test_detections_are_unchanged_by_recording_and_the_hooks_are_removed(model):
    inputs = _inputs()
    before = _detections(model, inputs)
    results = detections_with_sampling(model, inputs)
    after = _detections(model, inputs)
    for expected, later, (instances, _, _) in zip(before, after, results):
        for other in (instances, later):
            assert torch.equal(expected.pred_boxes.tensor, other.pred_boxes.tensor)
            assert torch.equal(expected.scores, other.scores)
            assert torch.equal(expected.pred_classes, other.pred_classes)
    assert not any(module._forward_hooks for module in model.modules())


def test_each_detection_is_given_the_query_that_made_it(model):
    """A detection's score is its query's sigmoid class probability and its box is its
    query's box, read from a separate run of the model's last-layer predictions."""
    inputs = _inputs()
    results = detections_with_sampling(model, inputs)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        logits, boxes, _ = model.predictions(images)
    for index, (instances, queries, _) in enumerate(results):
        assert len(instances) == TOPK and queries.shape == (TOPK,)
        probabilities = logits[-1][index].sigmoid()
        torch.testing.assert_close(instances.scores, probabilities[queries, instances.pred_classes], rtol=0, atol=0)
        scale = torch.tensor([inputs[index]["width"], inputs[index]["height"]] * 2)
        cx, cy, w, h = boxes[-1][index, queries].unbind(-1)
        expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale
        expected = expected.clamp(min=0).minimum(scale)
        torch.testing.assert_close(instances.pred_boxes.tensor, expected, rtol=0, atol=1e-3)
    instances, _, _ = results[0]
    with pytest.raises(SetupError, match="top-k"):
        detection_queries(logits[-1][1], instances)


def test_encoder_references_are_the_centres_of_each_images_cells_in_its_pixels(model):
    """Each level's unpadded cells span the image: the reference point of the encoder
    position at (row, col) of a level lies at ((col + 0.5) / cols, (row + 0.5) / rows) of
    the drawn image's size, and encoder_position_at finds that position from it."""
    inputs = _inputs()
    samplings = [sampling for _, _, sampling in detections_with_sampling(model, inputs)]
    assert [sampling.valid_cells.tolist() for sampling in samplings] == [
        [[16, 12], [8, 6], [4, 3], [2, 2]], [[13, 16], [7, 8], [4, 4], [2, 2]]]
    assert [sampling.strides() for sampling in samplings] == [[8, 16, 32, 64]] * 2
    for item, sampling in zip(inputs, samplings):
        height, width = item["height"], item["width"]
        for level, (rows, cols) in enumerate(sampling.valid_cells.tolist()):
            for row, col in ((0, 0), (rows - 1, cols - 1), (rows // 2, cols // 3)):
                centre = ((col + 0.5) / cols * width, (row + 0.5) / rows * height)
                position = sampling.encoder_position_at(*centre, level=level)
                first = int(sampling.spatial_shapes[:level].prod(-1).sum())
                assert position == first + row * int(sampling.spatial_shapes[level, 1]) + col
                torch.testing.assert_close(sampling.encoder_references[position], torch.tensor(centre),
                                           rtol=0, atol=1e-3)


def test_decoder_references_are_the_models_reference_points_in_pixels(model):
    """Plain Deformable DETR: a query's reference point is a function of its learned
    position embedding, normalised by the unpadded image; in pixels of the drawn image
    whatever the padding. Box references: the last layer's reference boxes lie inside
    the image's span and their pixel widths scale with the drawn size."""
    inputs = _inputs()
    samplings = [sampling for _, _, sampling in detections_with_sampling(model, inputs)]
    for item, sampling in zip(inputs, samplings):
        size = torch.tensor([item["width"], item["height"]], dtype=torch.float32)
        assert sampling.decoder_locations.shape == (QUERIES, HEADS, LEVELS, POINTS, 2)
        if not model.two_stage:
            with torch.no_grad():
                position = model.query_embed.weight[:, :model.transformer.d_model]
                expected = model.transformer.reference_points(position).sigmoid() * size
            torch.testing.assert_close(sampling.decoder_references, expected, rtol=0, atol=1e-3)
        else:
            references = sampling.decoder_references
            assert references.shape == (QUERIES, 4)
            assert (references[:, :2] >= 0).all() and (references[:, :2] <= size).all()


def test_feature_level_count_is_the_models_and_none_without_deformable_attention(model):
    assert feature_level_count(model) == LEVELS
    torch.manual_seed(0)
    assert feature_level_count(build_model(config("tests/tiny.yaml"))) is None
