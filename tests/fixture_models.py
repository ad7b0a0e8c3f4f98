"""Build detr_d2 models that mirror the reference fixtures in ../shared/fixtures."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

import detr_d2
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixture_dir(name):
    """Path of a shared fixture, or skip the test with the reason."""
    path = FIXTURES / name
    if not (path / "checkpoint.pth").is_file():
        pytest.skip(f"fixture {path} is absent (it lives in ../shared beside the repository)")
    return path


def config_for_fixture(path):
    """A detectron2 config reproducing the fixture's config.json on top of Base-DETR.yaml."""
    spec = json.loads((path / "config.json").read_text())
    cfg = get_cfg()
    detr_d2.add_detr_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-DETR.yaml"))
    depth = int(spec["backbone"].replace("resnet", ""))
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.RES5_DILATION = 2 if spec["dilation"] else 1
    detr = cfg.MODEL.DETR
    detr.HIDDEN_DIM, detr.NHEADS = spec["hidden"], spec["nheads"]
    detr.ENC_LAYERS, detr.DEC_LAYERS = spec["enc"], spec["dec"]
    detr.DIM_FEEDFORWARD, detr.NUM_OBJECT_QUERIES = spec["ff"], spec["queries"]
    detr.DROPOUT, detr.PRE_NORM = spec["dropout"], spec["pre_norm"]
    detr.NUM_CLASSES = 80 if spec["num_classes"] == 91 else spec["num_classes"]
    detr.NO_OBJECT_WEIGHT = spec["eos_coef"]
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def convert_with_cli(source, output, *extra):
    """Run tools/convert_detr_checkpoint.py in a subprocess; returns the CompletedProcess."""
    command = [sys.executable, str(REPO / "tools" / "convert_detr_checkpoint.py"),
               "--source", str(source), "--output", str(output), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def converted_fixture_model(name, tmp_path):
    """(model in eval mode loaded through the converter CLI, inputs, expected) of a fixture."""
    path = fixture_dir(name)
    output = tmp_path / f"{name}.pth"
    result = convert_with_cli(path / "checkpoint.pth", output)
    assert result.returncode == 0, result.stderr
    model = build_model(config_for_fixture(path))
    DetectionCheckpointer(model).load(str(output))
    model.eval()
    inputs = torch.load(path / "inputs.pt", weights_only=True)
    expected = torch.load(path / "expected.pt", weights_only=True)
    return model, inputs, expected


def chw_images(inputs):
    """The fixture's HWC uint8 RGB images as CHW uint8 tensors."""
    return [image.permute(2, 0, 1).contiguous() for image in inputs["images_hwc_uint8_rgb"]]
