"""detr_d2.analysis.attention_maps on the bundled shapes DETR (checkpoints/shapes_detr_tiny.pth,
6 "pretrain" shapes, 128-px images, tiny CNN of stride 16 -> 8x8 feature maps, 8 heads, 50
queries) and on small random-weight models of the ResNet configs."""
import numpy as np
import pytest
import torch

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from detr_d2.acceleration import set_fast_paths
from detr_d2.analysis import detections_with_attention, record_attention
from detr_d2.data.shapes import PRESETS, generate_dataset
from detr_d2.engine import build_config
from detr_d2.engine.build import build_model
from detr_d2.utils.attention_drawing import confident_queries
from detr_d2.utils.inputs import read_input_image
from detr_d2.utils.predictor import BatchPredictor
from tests.helpers import REPO, config

BUNDLED_CONFIG = REPO / "checkpoints" / "shapes_detr_tiny.yaml"
BUNDLED_WEIGHTS = REPO / "checkpoints" / "shapes_detr_tiny.pth"
NUM_VAL_IMAGES = 8
HEADS, QUERIES, STRIDE = 8, 50, 16  # of the bundled model
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    """Generated validation images of the classes the bundled model was trained on (the
    "pretrain" preset): the dataset folder."""
    root = tmp_path_factory.mktemp("attention_shapes")
    generate_dataset(str(root), PRESETS["pretrain"], {"val": NUM_VAL_IMAGES})
    return root


@pytest.fixture(scope="module")
def val_images(val_dir):
    """The validation images, HWC uint8 RGB."""
    return [read_input_image(str(path), "RGB") for path in sorted((val_dir / "images" / "val").glob("*.png"))]


@pytest.fixture(scope="module")
def predictor(val_dir):
    """BatchPredictor of the bundled model, class names from the validation set."""
    dataset = ("attention_maps_val", str(val_dir / "annotations" / "val.json"), str(val_dir / "images" / "val"))
    register = repr((dataset,))
    opts = ["MODEL.WEIGHTS", str(BUNDLED_WEIGHTS), "DATASETS.REGISTER_COCO", register,
            "DATASETS.TRAIN", "('attention_maps_val',)", "DATASETS.TEST", "()"]
    return BatchPredictor(build_config(str(BUNDLED_CONFIG), opts, all_datasets_registered=False))


def _square_and_tall_inputs(predictor, val_images):
    """Model inputs of a 128x128 validation image and a 128x80 (HxW) crop of another: the
    crop is resized to 205x128, so the square one is padded at the bottom in the batch."""
    square, other = val_images[:2]
    return [predictor.model_input(square), predictor.model_input(np.ascontiguousarray(other[:, 24:104]))]


def _outputs(model, inputs):
    with torch.no_grad():
        return [output["instances"] for output in model(inputs)]


def _assert_same_outputs(expected, actual):
    for a, b in zip(expected, actual):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)


def test_maps_cover_the_feature_cells_and_sum_to_one_per_query_and_head(predictor, val_images):
    """A padded batch: each image's maps have its unpadded feature-map shape, sum to 1 over
    it for every query / source cell and head; the recording puts no mass on padding."""
    inputs = _square_and_tall_inputs(predictor, val_images)
    with torch.no_grad(), record_attention(predictor.model) as recording:
        predictor.model(inputs)
    assert recording.padding_mask.shape == (2, 13, 8)  # 205x128 padded batch, stride 16
    assert recording.decoder.shape == (2, HEADS, QUERIES, 13 * 8)
    assert recording.encoder.shape == (2, HEADS, 13 * 8, 13 * 8)
    padding = recording.padding_mask.flatten(1)[:, None, None, :]
    assert recording.decoder.masked_select(padding).abs().max() == 0
    assert recording.encoder.masked_select(padding).abs().max() == 0

    [(_, square), (_, tall)] = detections_with_attention(predictor.model, inputs)
    alone = detections_with_attention(predictor.model, inputs[:1])[0][1]
    assert alone.decoder.shape == (HEADS, QUERIES, 128 // STRIDE, 128 // STRIDE)
    assert tall.decoder.shape == (HEADS, QUERIES, 13, 8)
    assert square.cells == (9, 8)  # DETR's nearest-resized mask keeps a 9th row, mostly padding
    for attention in (alone, square, tall):
        rows, cols = attention.cells
        assert attention.encoder.shape == (HEADS, rows * cols, rows, cols)
        torch.testing.assert_close(attention.decoder.sum((-2, -1)), torch.ones(HEADS, QUERIES))
        torch.testing.assert_close(attention.encoder.sum((-2, -1)), torch.ones(HEADS, rows * cols))


def test_decoder_attention_of_a_detection_is_dense_inside_its_box(predictor, val_images):
    """For every detection scoring >= 0.5 on the validation images: the head-averaged map
    upsampled to the image (to_image, renormalised to sum 1) has a mean value per pixel
    inside the detected box and another outside it; their ratio is 1 for attention that
    ignores the box. Measured: 14.7 on average over the 37 detections of these 8 images,
    9.5 at least (14.8 / 7.7 over 799 detections of 200 validation images)."""
    ratios = []
    for image in val_images:
        [(instances, attention)] = detections_with_attention(predictor.model, [predictor.model_input(image)])
        queries = confident_queries(instances, THRESHOLD)
        maps = attention.to_image(attention.decoder[:, queries].mean(0))
        maps = maps / maps.sum((-2, -1), keepdim=True)
        ys, xs = torch.meshgrid(torch.arange(128) + 0.5, torch.arange(128) + 0.5, indexing="ij")
        for heat, (x0, y0, x1, y1) in zip(maps, instances[queries].pred_boxes.tensor.tolist()):
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            ratios.append(heat[inside].mean() / heat[~inside].mean())
    ratios = torch.stack(ratios)
    assert len(ratios) >= NUM_VAL_IMAGES
    assert ratios.mean() > 5 and ratios.min() > 2, ratios


def test_encoder_map_from_a_point_is_that_of_the_cell_holding_it(predictor, val_images):
    _, attention = detections_with_attention(predictor.model, [predictor.model_input(val_images[0])])[0]
    assert attention.encoder_cell_at(x=20, y=100) == (100 // STRIDE) * 8 + 20 // STRIDE
    assert attention.encoder_cell_at(x=127.9, y=0) == 7
    torch.testing.assert_close(attention.encoder_from(20, 100), attention.encoder[:, 6 * 8 + 1])


@pytest.mark.parametrize("fast_paths", [True, False])
def test_outputs_are_identical_with_and_without_the_hooks_which_are_removed_after(predictor, val_images,
                                                                                  fast_paths):
    """The bundled model with its fast paths (folded norms, FastMaskMultiheadAttention) and without."""
    inputs = _square_and_tall_inputs(predictor, val_images)
    model = set_fast_paths(predictor.model, fast_paths)
    try:
        before = _outputs(model, inputs)
        with record_attention(model) as recording:
            during = _outputs(model, inputs)
        after = _outputs(model, inputs)
    finally:
        set_fast_paths(model, True)
    assert recording.decoder.shape == (2, HEADS, QUERIES, 13 * 8)
    _assert_same_outputs(before, during)
    _assert_same_outputs(before, after)
    assert not any(module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("config_file, stride, opts", [
    ("detr_r50.yaml", 32, ()), ("detr_r50_dc5.yaml", 16, ()), ("detr_r101.yaml", 32, ()),
    ("detr_r50.yaml", 32, ("MODEL.MASK_ON", "True", "MODEL.DETR.HIDDEN_DIM", "128")),
])
def test_resnet_and_mask_configs_give_maps_of_their_feature_map(config_file, stride, opts):
    """Random weights, small transformer: shapes, sums and unchanged outputs (masks too)."""
    torch.manual_seed(0)
    cfg = config(config_file, "MODEL.DETR.NUM_CLASSES", "3", "MODEL.DETR.HIDDEN_DIM", "32",
                 "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "1",
                 "MODEL.DETR.NUM_OBJECT_QUERIES", "5", *opts)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.randint(0, 256, (3, 160, 224), dtype=torch.uint8), "height": 80, "width": 112}]
    expected = _outputs(model, inputs)
    [(instances, attention)] = detections_with_attention(model, inputs)
    _assert_same_outputs(expected, [instances])
    if cfg.MODEL.MASK_ON:
        assert torch.equal(expected[0].pred_masks, instances.pred_masks)
    assert attention.decoder.shape == (8, 5, -(-160 // stride), -(-224 // stride))
    torch.testing.assert_close(attention.decoder.sum((-2, -1)), torch.ones(8, 5))
    assert attention.to_image(attention.decoder[:, :2]).shape == (8, 2, 80, 112)
