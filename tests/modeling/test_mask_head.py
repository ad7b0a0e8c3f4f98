"""MODEL.MASK_ON: the mask head is built from the config, trains on PolygonMasks and
BitMasks, predicts bool masks per query, and its fast path equals the plain one."""
import pytest
import torch
from detectron2.modeling import build_model as build_plain_model
from detectron2.utils.events import EventStorage

from detr_d2.acceleration import set_fast_paths
from detr_d2.engine.build import build_model
from tests.helpers import batch_with_masks, small_config

MASK_OPTS = ("MODEL.MASK_ON", "True", "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.DROPOUT", "0.0")


def mask_config(*opts):
    return small_config(*MASK_OPTS, *opts)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_plain_model(mask_config())


def test_mask_on_builds_the_head_with_res2_to_res5_added_to_the_backbone(model):
    assert model.mask_head is not None
    assert set(model.backbone.body.output_shape()) == {"res2", "res3", "res4", "res5"}
    adapters = [model.mask_head.fpn.adapter1, model.mask_head.fpn.adapter2, model.mask_head.fpn.adapter3]
    assert [a.in_channels for a in adapters] == [256, 128, 64]  # ResNet-18 res4, res3, res2
    assert {"loss_mask", "loss_dice"} <= set(model.criterion.weight_dict)


def test_mask_off_keeps_predict_and_has_no_mask_head():
    torch.manual_seed(0)
    plain = build_plain_model(small_config())
    assert plain.mask_head is None and "loss_mask" not in plain.criterion.weight_dict
    images = plain.preprocess_image([{"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}])
    assert len(plain.predict(images)) == 2


def test_training_losses_with_polygon_and_bit_masks_agree_and_reach_the_mask_head(model):
    model.train()
    with EventStorage():
        polygon_losses = model(batch_with_masks(as_bitmasks=False))
        bitmask_losses = model(batch_with_masks(as_bitmasks=True))
    assert {"loss_mask", "loss_dice"} <= set(polygon_losses)
    assert "loss_mask_0" not in polygon_losses  # no mask losses on auxiliary layers
    for key, value in polygon_losses.items():
        torch.testing.assert_close(bitmask_losses[key], value, msg=key)
    model.zero_grad()
    (polygon_losses["loss_mask"] + polygon_losses["loss_dice"]).backward()
    for name, parameter in model.mask_head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_inference_gives_bool_masks_per_query_at_the_requested_size(model):
    model.eval()
    images = [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8), torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)]
    with torch.no_grad():
        outputs = model([{"image": images[0], "height": 96, "width": 120}, {"image": images[1]}])
    assert outputs[0]["instances"].pred_masks.shape == (7, 96, 120)
    assert outputs[1]["instances"].pred_masks.shape == (7, 48, 64)
    assert outputs[0]["instances"].pred_masks.dtype == torch.bool


def test_accelerated_mask_model_equals_the_plain_path():
    torch.manual_seed(0)
    fast = build_model(mask_config()).eval()
    assert hasattr(fast.backbone, "prepacked")
    images = fast.preprocess_image([{"image": torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)},
                                    {"image": torch.randint(0, 256, (3, 64, 52), dtype=torch.uint8)}])
    outputs = {}
    for enabled in (True, False):
        set_fast_paths(fast, enabled)
        with torch.no_grad():
            outputs[enabled] = fast.predict_with_masks(images)
    for fast_value, plain_value in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(fast_value, plain_value, atol=1e-4, rtol=1e-4)


def tiny_cnn_mask_config(stride):
    return mask_config("MODEL.BACKBONE.NAME", "build_tiny_cnn_backbone", "MODEL.DETR.IN_FEATURE", "out",
                       "MODEL.TINY_CNN.STRIDE", stride, "MODEL.TINY_CNN.NUM_LAYERS", 4, "MODEL.BACKBONE.FREEZE_AT", 0)


def test_the_tiny_cnn_gives_its_earlier_stages_to_the_mask_head():
    torch.manual_seed(0)
    model = build_plain_model(tiny_cnn_mask_config(16)).eval()
    assert model.mask_head.level_names == ["stage3", "stage2", "stage1"]
    assert [a.in_channels for a in (model.mask_head.fpn.adapter1, model.mask_head.fpn.adapter2,
                                    model.mask_head.fpn.adapter3)] == [128, 64, 32]
    with torch.no_grad():
        _, _, mask_logits = model.predict_with_masks(model.preprocess_image([{"image": torch.zeros(3, 64, 48, dtype=torch.uint8)}]))
    assert mask_logits.shape == (1, 7, 32, 24)  # stride 2, the finest stage


def test_a_backbone_with_too_few_levels_is_refused_with_the_key():
    with pytest.raises(ValueError, match="MODEL.RESNETS.OUT_FEATURES"):
        build_plain_model(tiny_cnn_mask_config(4))


def test_hidden_dim_the_head_cannot_use_is_refused():
    with pytest.raises(ValueError, match="MODEL.DETR.HIDDEN_DIM"):
        build_plain_model(small_config("MODEL.MASK_ON", "True"))


def test_training_computes_only_the_matched_masks_with_the_same_losses_and_gradients(model):
    """Training runs the mask head on the matched queries only (training_predictions); the
    losses and every gradient equal those from all queries' masks (predict_with_masks)."""
    model.train()
    batch = batch_with_masks()
    results = []
    for matched_only in (True, False):
        images = model.preprocess_image(batch)
        targets = model.prepare_targets(batch, images.image_sizes)
        predictions = model.training_predictions(images) if matched_only else model.predict_with_masks(images)
        assert callable(predictions[2]) == matched_only
        losses = model.criterion(*predictions[:2], targets, predictions[2])
        model.zero_grad()
        sum(model.weighted_losses(losses).values()).backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (matched_losses, matched_grads), (all_losses, all_grads) = results
    for key, value in all_losses.items():
        torch.testing.assert_close(matched_losses[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert set(matched_grads) == set(all_grads)
    for name, grad in all_grads.items():  # float sums in another order: equal to 1e-5 of the scale
        scale = grad.abs().max().item()  # (a conv bias before a GroupNorm gets ~1e-9: no scale)
        assert (matched_grads[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-7, name
