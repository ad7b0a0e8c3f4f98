"""The tiny CNN backbone, a Detr built on it from configs/shapes, and tools/pretrain_backbone.py."""
import subprocess
import sys

import pytest
import torch

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr and the tiny CNN)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from detr_d2 import add_detr_config
from detr_d2.data.shapes import generate_dataset
from detr_d2.engine import merge_config
from detr_d2.modeling.tiny_backbone import TinyCNN, add_tiny_cnn_config, tiny_cnn_stage_depths
from tests.helpers import REPO

CONFIG = REPO / "configs" / "shapes" / "Base-Shapes.yaml"
PRETRAIN_SCRIPT = REPO / "tools" / "pretrain_backbone.py"


def _shapes_cfg(*opts):
    cfg = get_cfg()
    add_detr_config(cfg)
    add_tiny_cnn_config(cfg)
    merge_config(cfg, str(CONFIG), ["MODEL.DETR.NUM_CLASSES", "2", *opts])
    return cfg


@pytest.mark.parametrize("stride, depths, channels", [(16, [2, 2, 2, 2], 256), (8, [2, 3, 3], 128)])
def test_tiny_cnn_output_shape_matches_its_output(stride, depths, channels):
    assert tiny_cnn_stage_depths(8, stride) == depths
    net = TinyCNN(width=32, num_layers=8, stride=stride, out_feature="feat")
    shape = net.output_shape()["feat"]
    assert (shape.channels, shape.stride) == (channels, stride)
    out = net(torch.zeros(2, 3, 128, 96))["feat"]
    assert out.shape == (2, channels, 128 // stride, 96 // stride)


def test_tiny_cnn_rejects_bad_geometry():
    with pytest.raises(ValueError, match="power of two"):
        TinyCNN(stride=12)
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        TinyCNN(num_layers=3, stride=16)


def test_freeze_at_freezes_whole_stages():
    net = TinyCNN(stride=16, freeze_at=2)
    assert not any(p.requires_grad for p in net.stage2.parameters())
    assert all(p.requires_grad for p in net.stage3.parameters())
    assert isinstance(net.stage1[0].norm, FrozenBatchNorm2d)
    assert isinstance(net.stage3[0].norm, torch.nn.BatchNorm2d)


def _random_inputs(num_images=2, size=128):
    inputs = []
    for i in range(num_images):
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [64.0, 70.0, 120.0, 110.0]]))
        instances.gt_classes = torch.tensor([0, 1])
        inputs.append({"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8),
                       "height": size, "width": size, "instances": instances})
    return inputs


def test_detr_with_tiny_backbone_trains_and_predicts():
    torch.manual_seed(0)
    model = build_model(_shapes_cfg())
    assert model.backbone.num_channels == 256
    assert isinstance(model.backbone.body.stage1[0].norm, FrozenBatchNorm2d)
    model.train()
    losses = model(_random_inputs())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.stage1[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        outputs = model(_random_inputs())
    instances = outputs[0]["instances"]
    assert len(instances) == 50 and instances.pred_boxes.tensor.shape == (50, 4)


def test_pretrain_backbone_writes_a_checkpoint_detr_loads(tmp_path):
    data_dir = tmp_path / "shapes"
    generate_dataset(str(data_dir), ["circle", "triangle"], {"train": 16, "val": 4})
    output = tmp_path / "backbone" / "backbone.pth"
    command = [sys.executable, str(PRETRAIN_SCRIPT), "--config-file", str(CONFIG),
               "--dataset-dir", str(data_dir), "--output", str(output), "--max-iter", "3",
               "--max-minutes", "0", "--batch-size", "4", "--eval-period", "0",
               "--warmup-iters", "2", "--log-period", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dense head AP" in result.stdout + result.stderr
    assert output.is_file() and (tmp_path / "backbone" / "backbone_log.txt").is_file()

    saved = torch.load(output, map_location="cpu", weights_only=True)
    assert saved["pretrain"]["iterations"] == 3
    model = build_model(_shapes_cfg())
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(output)))
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert not incompatible.unexpected_keys
    loaded = model.state_dict()
    for key, tensor in saved["model"].items():
        assert torch.equal(loaded[key], tensor), key
