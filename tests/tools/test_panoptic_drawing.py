"""tools/demo.py with a MODEL.DETR.PANOPTIC_ON model, run as a real subprocess: it draws the
panoptic segmentation with detectron2's Visualizer and writes the segment-id PNGs and
panoptic.json. The model is the converted reference DETRsegm fixture (6 classes) on a
generated panoptic shapes set of 3 things + 3 stuff classes (non-contiguous dataset ids),
registered from the config, whose metadata gives the class names and the thing classes."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import Metadata

from detr_d2.engine import build_config
from detr_d2.utils.inputs import read_input_image
from detr_d2.utils.panoptic_outputs import draw_panoptic, panoptic_drawing_metadata
from detr_d2.utils.predictor import BatchPredictor
from tests.helpers import REPO, panoptic_fixture_config

THINGS = ("circle", "ellipse", "rectangle")
STUFF = ("sky", "ground", "water")
DATASET_IDS = {"circle": 1, "ellipse": 3, "rectangle": 5, "sky": 100, "ground": 102, "water": 104}
THRESHOLD = 0.3  # random weights: the reference's 0.85 keeps nothing


def read_rgb(path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    return image[:, :, ::-1]


@pytest.fixture(scope="module")
def panoptic_demo(tmp_path_factory, converted_reference):
    """(config file, validation image paths, demo output folder, the demo's CompletedProcess)."""
    root = tmp_path_factory.mktemp("panoptic_demo")
    cfg, data = panoptic_fixture_config(root, THINGS, {"val": 2}, "demo_panoptic_val", converted_reference)
    cfg.MODEL.DETR.PANOPTIC_THRESHOLD = THRESHOLD
    cfg.DATASETS.TEST = ()
    config = root / "panoptic.yaml"
    config.write_text(cfg.dump())
    images = sorted((data / "images" / "val").glob("*.png"))
    output = root / "out"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--config-file", str(config),
                          "--input", *map(str, images), "--output", str(output), "--draw-scale", "3"],
                         cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    return config, images, output, run


@pytest.mark.slow
def test_demo_draws_panoptic_segments_with_names_and_writes_them(panoptic_demo):
    config, images, output, run = panoptic_demo
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    annotations = json.loads((output / "panoptic.json").read_text())["annotations"]
    assert [a["file_name"] for a in annotations] == [str(path) for path in images]
    predictor = BatchPredictor(build_config(str(config), ["MODEL.DEVICE", "cpu"]))
    assert predictor.panoptic
    for path, annotation in zip(images, annotations):
        image = read_rgb(path)
        drawing = read_rgb(output / f"{path.stem}.png")
        assert drawing.shape == (3 * image.shape[0], 3 * image.shape[1], 3)
        segments_rgb = read_rgb(output / annotation["segments_file"]).astype(np.int64)
        ids = segments_rgb[..., 0] + 256 * segments_rgb[..., 1] + 65536 * segments_rgb[..., 2]
        assert annotation["segments_file"] == f"{path.stem}_segments.png" and ids.shape == image.shape[:2]
        segments = annotation["segments_info"]
        assert segments, "some query passes the threshold"
        assert sorted(np.unique(ids).tolist()) == [s["id"] for s in segments]
        for segment in segments:
            assert segment["area"] == int((ids == segment["id"]).sum())
            assert DATASET_IDS[segment["category_name"]] == segment["category_id"]
            assert segment["isthing"] == (segment["category_name"] in THINGS)
            assert segment["score"] > THRESHOLD
        seg, segments_info = predictor.outputs([read_input_image(str(path), predictor.image_format)])[0]["panoptic_seg"]
        assert np.array_equal(seg.numpy(), ids)  # what the demo wrote is the model's panoptic_seg
        assert [s["score"] for s in segments_info] == pytest.approx([s["score"] for s in segments], abs=1e-5)
        # the drawing paints every segment: few pixels keep the (enlarged) input's colours
        enlarged = cv2.resize(image, drawing.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        assert (np.abs(drawing.astype(int) - enlarged.astype(int)).sum(-1) > 30).mean() > 0.5


def test_drawing_without_segments_or_names():
    """No query kept (all ids 0): the image itself; a model whose data has no names gets
    "class <i>" names for things and stuff."""
    image = np.full((20, 30, 3), 90, dtype=np.uint8)
    metadata = panoptic_drawing_metadata(Metadata(name="no_names"), 3)
    assert metadata.thing_classes == metadata.stuff_classes == ["class 0", "class 1", "class 2"]
    empty = draw_panoptic(image, (torch.zeros((20, 30), dtype=torch.int32), []), metadata)
    assert np.array_equal(empty, image)
    seg = torch.zeros((20, 30), dtype=torch.int32)
    seg[5:15, 5:25] = 1
    drawn = draw_panoptic(image, (seg, [{"id": 1, "category_id": 2, "isthing": True, "score": 0.9, "area": 200}]),
                          metadata, scale=2)
    # the colour is detectron2's random pick, which may be a grey near the image's 90: the
    # segment's pixels change, by however little, and the rest keep the image's grey
    painted = (drawn != 90).any(-1)
    assert drawn.shape == (40, 60, 3) and painted[10:30, 10:50].mean() > 0.9 and painted[:6].mean() < 0.1
