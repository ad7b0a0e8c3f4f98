"""Masks in the drawing tools, run as real subprocesses: tools/demo.py draws and records
the masks of a MODEL.MASK_ON model (the converted reference DETRsegm fixture), and
tools/visualize_data.py shows the ground-truth masks after augmentation."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor

from detr_d2 import add_detr_config
from tests.helpers import REPO, TINY_CONFIG, config_for_fixture, fixture_dir, write_coco_split

TEST_SIZE = 112


def run_tool(tool, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


def read_rgb(path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    return image[:, :, ::-1]


def segm_fixture_config(tmp_path, converted_reference):
    """(config file, CfgNode) of the converted DETRsegm fixture model, no datasets."""
    fixture = fixture_dir("detr_upstream_segm_tiny")
    weights, _ = converted_reference("detr_upstream_segm_tiny")
    cfg = config_for_fixture(fixture)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = TEST_SIZE, 400
    cfg.MODEL.DETR.FAST_PATHS = False  # the plain computation, as DefaultPredictor's model
    path = tmp_path / "segm.yaml"
    path.write_text(cfg.dump())
    return path, cfg


@pytest.mark.slow
def test_demo_draws_and_records_the_predicted_masks(tmp_path, converted_reference):
    config, cfg = segm_fixture_config(tmp_path, converted_reference)
    images = torch.load(fixture_dir("detr_upstream_segm_tiny") / "inputs.pt", weights_only=True)["images_hwc_uint8_rgb"]
    image_path = tmp_path / "shapes.png"
    cv2.imwrite(str(image_path), images[0].numpy()[:, :, ::-1])
    output = tmp_path / "out"
    result = run_tool("demo.py", "--config-file", config, "--input", image_path, "--output", output,
                      "--confidence-threshold", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((output / "predictions.json").read_text())
    assert len(records) == cfg.MODEL.DETR.NUM_OBJECT_QUERIES
    expected = DefaultPredictor(cfg)(cv2.imread(str(image_path)))["instances"].pred_masks.numpy()
    recorded = np.stack([mask_util.decode(r["segmentation"]) for r in records]).astype(bool)
    assert np.array_equal(recorded, expected)
    original, drawn = read_rgb(image_path), read_rgb(output / "shapes.png")
    assert drawn.shape == original.shape
    changed = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) > 10
    covered = expected.any(0)
    assert covered.mean() > 0.05 and changed[covered].mean() > 0.9  # masks are filled with colour


def visualize_dataloader(tmp_path, name, mask_on):
    """Drawings of tools/visualize_data.py --source dataloader on a COCO set whose boxes
    are filled rectangles with their masks (polygons and RLE); {file name: RGB image}."""
    if not (tmp_path / "coco").exists():
        write_coco_split(tmp_path / "coco", "train", num_images=2, seed=3, with_masks=True)
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    cfg.DATASETS.REGISTER_COCO = (("masks_train", str(tmp_path / "coco/annotations/instances_train.json"),
                                   str(tmp_path / "coco/train")),)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("masks_train",), ()
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.DETR.HIDDEN_DIM, cfg.MODEL.DETR.NHEADS = 128, 8
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.SEED = 4
    config = tmp_path / f"{name}.yaml"
    config.write_text(cfg.dump())
    result = run_tool("visualize_data.py", "--config-file", config, "--source", "dataloader",
                      "--output-dir", tmp_path / name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {p.name: read_rgb(p) for p in sorted((tmp_path / name).glob("*.png"))}


@pytest.mark.slow
def test_visualize_data_fills_the_ground_truth_masks_after_augmentation(tmp_path):
    with_masks = visualize_dataloader(tmp_path, "masks", mask_on=True)
    boxes_only = visualize_dataloader(tmp_path, "boxes", mask_on=False)
    assert sorted(with_masks) == sorted(boxes_only) and len(with_masks) == 2
    for name, drawing in with_masks.items():
        differs = np.abs(drawing.astype(int) - boxes_only[name].astype(int)).max(axis=2) > 10
        assert differs.mean() > 0.05, name  # the mask fill inside the (same) boxes
