"""DeformableDetr in every flavour (plain, refinement, two-stage with and without refinement,
single-scale): a training step and an inference pass of configs/tests/tiny_deformable.yaml
(ResNet-18 res3-res5 + one extra level, 1 encoder / 2 decoder layers, 10 queries, top-20
detections), and the per-image criterion of the evaluation with the two-stage proposals."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from detr_d2 import add_detr_config
from detr_d2.engine import build_config, merge_config
from detr_d2.engine.build import build_model
from detr_d2.engine.optimizer import build_detr_optimizer
from detr_d2.errors import SetupError
from tests.helpers import REPO, training_input

DEFORMABLE_CONFIG = REPO / "configs" / "tests" / "tiny_deformable.yaml"
NUM_CLASSES, TOPK, DECODER_LAYERS = 3, 20, 2
REFINE = ("MODEL.MULTI_SCALE.WITH_BOX_REFINE", "True")
TWO_STAGE = ("MODEL.MULTI_SCALE.TWO_STAGE", "True")
FLAVOURS = {
    "plain": (),
    "refine": REFINE,
    "two_stage": TWO_STAGE,
    "two_stage_refine": TWO_STAGE + REFINE,
    "single_scale": ("MODEL.MULTI_SCALE.IN_FEATURES", "['res5']", "MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS", "1",
                     "MODEL.RESNETS.OUT_FEATURES", "['res5']"),
}


def deformable_cfg(*opts):
    cfg = merge_config(add_detr_config(get_cfg()), str(DEFORMABLE_CONFIG), [str(o) for o in opts])
    cfg.MODEL.DETR.NUM_CLASSES = NUM_CLASSES
    return cfg


def deformable_model(*opts):
    torch.manual_seed(0)
    return build_model(deformable_cfg(*opts))


def batch():
    torch.manual_seed(1)
    return [training_input(96, 128, [[10, 10, 60, 50], [70, 20, 120, 90]], [1, 0]),
            training_input(128, 96, [[5, 20, 40, 90]], [2])]


def expected_loss_keys(two_stage):
    names = ("loss_ce", "loss_bbox", "loss_giou")
    suffixes = ["", *(f"_{i}" for i in range(DECODER_LAYERS - 1)), *(["_enc"] if two_stage else [])]
    return {name + suffix for name in names for suffix in suffixes}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_training_steps_give_finite_losses_and_gradients_to_every_trainable_parameter(flavour):
    """Two optimizer steps: the heads' last layers and the attention-weight projections start
    at zero (the reference's initialisation), so some gradients are zero at the first step;
    from the second, every trainable parameter gets one."""
    cfg = deformable_cfg(*FLAVOURS[flavour])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_detr_optimizer(cfg, model)
    for _ in range(2):
        optimizer.zero_grad()
        with EventStorage():
            losses = model(batch())
        assert set(losses) == expected_loss_keys("TWO_STAGE" in " ".join(FLAVOURS[flavour]))
        assert all(torch.isfinite(value) for value in losses.values()), losses
        sum(losses.values()).backward()
        optimizer.step()
    without = [name for name, parameter in model.named_parameters()
               if parameter.requires_grad and (parameter.grad is None or not parameter.grad.abs().sum() > 0)]
    assert not without, without


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_inference_gives_the_top_k_detections_in_the_requested_size(flavour):
    model = deformable_model(*FLAVOURS[flavour]).eval()
    inputs = [{"image": item["image"], "height": height, "width": width}
              for item, (height, width) in zip(batch(), [(48, 64), (300, 225)])]
    with torch.no_grad():
        results = model(inputs)
    for result, item in zip(results, inputs):
        instances = result["instances"]
        assert len(instances) == TOPK and instances.image_size == (item["height"], item["width"])
        boxes = instances.pred_boxes.tensor
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= item["width"]).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= item["height"]).all()
        assert (instances.scores[:-1] >= instances.scores[1:]).all() and (instances.scores <= 1).all()
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < NUM_CLASSES)).all()


def test_per_image_criterion_with_two_stage_proposals_equals_each_image_alone():
    """``inference_with_losses`` on a batch slices the two-stage proposals (a tuple) per
    image: each image's values, ``_enc`` included, are those of the image evaluated alone
    (images of one size: the batch adds no padding)."""
    model = deformable_model(*TWO_STAGE, *REFINE).eval()
    torch.manual_seed(2)
    inputs = [training_input(96, 128, [[10, 10, 60, 50]], [1]), training_input(96, 128, [[30, 5, 90, 70]], [2])]
    with torch.no_grad():
        results, losses = model.inference_with_losses(inputs)
        alone = [model.inference_with_losses([item])[1][0] for item in inputs]
    assert len(results) == 2 and all(len(result["instances"]) == TOPK for result in results)
    for image_losses, image_alone in zip(losses, alone):
        assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(image_losses)
        assert set(image_losses) == set(image_alone)
        for name, value in image_alone.items():
            torch.testing.assert_close(image_losses[name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert losses[0]["loss_bbox_enc"] != losses[1]["loss_bbox_enc"]


@pytest.mark.parametrize("key, value", [
    ("MODEL.MASK_ON", "True"), ("MODEL.DETR.PANOPTIC_ON", "True"), ("MODEL.DETR.FROZEN_WEIGHTS", "detector.pth"),
    ("MODEL.DETR.NUM_QUERY_GROUPS", "3"), ("MODEL.DETR.POSITION_EMBEDDING", "learned"), ("MODEL.DETR.PRE_NORM", "True"),
])
def test_detr_only_options_are_refused_naming_the_key(key, value):
    with pytest.raises(SetupError) as error:
        build_config(str(DEFORMABLE_CONFIG), [key, value, "MODEL.DETR.NUM_CLASSES", "3"], all_datasets_registered=False)
    message = str(error.value)
    assert key in message and "'DeformableDetr'" in message and "\n" not in message


@pytest.mark.parametrize("key, value", [
    ("MODEL.MULTI_SCALE.NUM_FEATURE_LEVELS", "2"), ("MODEL.MULTI_SCALE.ENC_N_POINTS", "0"),
    ("MODEL.MULTI_SCALE.TOPK_DETECTIONS", "0"), ("MODEL.MULTI_SCALE.FOCAL_ALPHA", "1.5"),
    ("MODEL.MULTI_SCALE.IN_FEATURES", "[]"), ("MODEL.DETR.HIDDEN_DIM", "48"),
])
def test_multi_scale_values_it_cannot_build_are_refused_naming_the_key(key, value):
    with pytest.raises(SetupError, match=key.replace(".", r"\.")):
        build_config(str(DEFORMABLE_CONFIG), [key, value, "MODEL.DETR.NUM_CLASSES", "3"], all_datasets_registered=False)
