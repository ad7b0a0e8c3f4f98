"""The segmentation configs (and the original wrapper's detr_segm config, unchanged) build
DETR with its mask head on a ResNet giving res2-res5."""
import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detr_d2 import add_detr_config
from detr_d2.engine import merge_config
from tests.helpers import REPO, merged_config

WRAPPER_SEGM = REPO / "configs" / "reference_wrapper" / "detr_segm_256_6_6_torchvision.yaml"


def assert_mask_model(model, depth):
    assert model.mask_head is not None
    shapes = model.backbone.body.output_shape()
    assert {"res2", "res3", "res4", "res5"} <= set(shapes)
    assert model.mask_head.fpn.adapter1.in_channels == shapes["res4"].channels == 1024
    assert len(model.backbone.body.res4) == {50: 6, 101: 23}[depth]
    assert {"loss_mask", "loss_dice"} <= set(model.criterion.weight_dict)


def test_the_reference_wrappers_segm_config_loads_unchanged_and_builds_the_mask_model():
    cfg = merge_config(add_detr_config(get_cfg()), str(WRAPPER_SEGM),
                       ["MODEL.DEVICE", "cpu", "MODEL.DETR.NUM_CLASSES", "80"])
    assert cfg.MODEL.META_ARCHITECTURE == "Detr" and cfg.MODEL.MASK_ON and cfg.MODEL.MASK_THRESHOLD == 0.5
    assert_mask_model(build_model(cfg), 50)


@pytest.mark.parametrize("name, depth, dilation", [("detr_r50_segm.yaml", 50, 1), ("detr_r50_dc5_segm.yaml", 50, 2),
                                                   ("detr_r101_segm.yaml", 101, 1)])
def test_segm_configs_build_the_mask_model(name, depth, dilation):
    cfg = merged_config(name, "MODEL.DETR.NUM_CLASSES", "80")
    assert cfg.MODEL.RESNETS.RES5_DILATION == dilation
    assert cfg.SOLVER.MAX_ITER == 46206
    assert_mask_model(build_model(cfg), depth)
