"""The reference wrapper's two configs (configs/reference_wrapper/, unchanged copies of its
d2/configs/) load here unchanged and mean what they meant there."""
import pytest
import torch
from detectron2.config import get_cfg

from detr_d2 import add_detr_config
from detr_d2.data import resolve_num_classes
from detr_d2.engine import Trainer, merge_config
from detr_d2.engine.build import build_model
from tests.helpers import REPO, config

WRAPPER = REPO / "configs" / "reference_wrapper"
PAIRS = [("detr_256_6_6_torchvision.yaml", "detr_r50.yaml"), ("detr_segm_256_6_6_torchvision.yaml", "detr_r50_segm.yaml")]
SMALL = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.DETR.HIDDEN_DIM", "128",
         "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "1",
         "MODEL.DETR.NUM_OBJECT_QUERIES", "5"]


def wrapper_config(name, *opts):
    """As build_config reads it: detr_d2's keys, the file, overrides; classes from the datasets."""
    cfg = merge_config(add_detr_config(get_cfg()), str(WRAPPER / name), ["MODEL.DEVICE", "cpu", *opts])
    resolve_num_classes(cfg)
    return cfg


def shapes_and_trainable(model):
    return ({key: tuple(value.shape) for key, value in model.state_dict().items()},
            {name for name, parameter in model.named_parameters() if parameter.requires_grad})


@pytest.mark.parametrize("wrapper_file, ours", PAIRS)
def test_wrapper_config_builds_the_model_of_the_matching_detr_d2_config(wrapper_file, ours):
    cfg = wrapper_config(wrapper_file)
    assert cfg.MODEL.DETR.NUM_CLASSES == 80  # the wrapper's default, here from coco_2017_train
    assert shapes_and_trainable(build_model(cfg)) == shapes_and_trainable(build_model(config(ours)))


@pytest.mark.parametrize("wrapper_file", [pair[0] for pair in PAIRS])
def test_wrapper_config_keeps_the_wrappers_recipe(wrapper_file):
    cfg = wrapper_config(wrapper_file)
    model, detr, solver = cfg.MODEL, cfg.MODEL.DETR, cfg.SOLVER
    # detectron2's defaults the wrapper relied on: frozen BN, stem + res2 frozen
    assert (model.RESNETS.NORM, model.BACKBONE.FREEZE_AT, model.RESNETS.STRIDE_IN_1X1) == ("FrozenBN", 2, False)
    # the wrapper's add_detr_config defaults and its fixed choices, as detr_d2 keys
    assert (detr.HIDDEN_DIM, detr.NHEADS, detr.ENC_LAYERS, detr.DEC_LAYERS, detr.DIM_FEEDFORWARD) == (256, 8, 6, 6, 2048)
    assert (detr.DROPOUT, detr.PRE_NORM, detr.DEEP_SUPERVISION, detr.NO_OBJECT_WEIGHT) == (0.1, False, True, 0.1)
    assert (detr.CLASS_WEIGHT, detr.L1_WEIGHT, detr.GIOU_WEIGHT) == (1.0, 5.0, 2.0)
    assert (detr.COST_CLASS, detr.COST_BBOX, detr.COST_GIOU) == (1.0, 5.0, 2.0)  # its matcher: 1, L1, GIoU weights
    assert (detr.IN_FEATURE, detr.POSITION_EMBEDDING) == ("res5", "sine")  # its last feature, normalised sine
    assert (solver.OPTIMIZER, solver.BACKBONE_MULTIPLIER) == ("ADAMW", 0.1)
    assert (solver.CLIP_GRADIENTS.CLIP_TYPE, solver.CLIP_GRADIENTS.CLIP_VALUE) == ("full_model", 0.01)
    crop = cfg.INPUT.CROP  # its mapper: with p 0.5 a resize to 400/500/600, then the absolute crop
    assert (crop.TYPE, tuple(crop.SIZE), tuple(crop.PRE_RESIZE_SIZES), crop.PROBABILITY) == \
        ("absolute_range", (384, 600), (400, 500, 600), 0.5)


def test_segm_wrapper_config_freezes_the_detector_of_a_wrapper_layout_file(tmp_path):
    """FROZEN_WEIGHTS of the segm config names a detector file of the wrapper's layout."""
    detector = build_model(wrapper_config("detr_256_6_6_torchvision.yaml", *SMALL))
    wrapper_keys = {("detr.backbone.0.backbone." + key[len("backbone.body."):] if key.startswith("backbone.body.")
                     else "detr." + key): value for key, value in detector.state_dict().items()}
    path = tmp_path / "wrapper_model_final.pth"
    torch.save({"model": wrapper_keys, "iteration": 554399}, path)
    cfg = wrapper_config("detr_segm_256_6_6_torchvision.yaml", *SMALL, "MODEL.DETR.FROZEN_WEIGHTS", str(path))
    model = Trainer.build_model(cfg)
    assert torch.equal(model.class_embed.weight, detector.class_embed.weight)
    assert torch.equal(model.backbone.body.res5[0].conv1.weight, detector.backbone.body.res5[0].conv1.weight)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith("mask_head.") for name in trainable)
