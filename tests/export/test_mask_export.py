"""MODEL.MASK_ON exports: the graph also returns mask logits, verification compares the
binary masks, the ONNX predictor turns them into masks of the original images and
tools/predict_onnx.py writes them into predictions.json as tools/demo.py does."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog

from detr_d2.engine.build import build_model
from detr_d2.export import ExportRequest, export_model
from detr_d2.export.verification import verification_images
from detr_d2.utils.predictor import BatchPredictor
from detr_d2_deploy.predictor import OnnxDetrPredictor
from PIL import Image

from tests.helpers import run_torch_free, save_weights, tiny_cfg

MASK_OPTS = ("MODEL.MASK_ON", "True", "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.NHEADS", "8")


@pytest.mark.slow
def test_mask_model_exports_to_onnx_with_masks_verified_and_predicted(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(*MASK_OPTS)
    model = build_model(cfg).eval()
    description, passed = export_model(model, cfg, "tiny.yaml", MetadataCatalog.get("coco_2017_train"),
                                       ExportRequest("onnx", str(tmp_path), verify=True))
    assert passed and [o["name"] for o in description["outputs"]] == ["logits", "boxes", "mask_logits"]
    assert description["postprocessing"]["mask_threshold"] == 0.5
    assert [b["mask_mismatches"] for b in description["verification"]["batches"]] == [0, 0, 0, 0]

    cfg.MODEL.WEIGHTS = str(save_weights(model, tmp_path / "weights.pth"))
    images = verification_images([(150, 211), (233, 171)], seed=3)  # resized to 128 px by both
    eager = BatchPredictor(cfg)(images)
    detections = OnnxDetrPredictor(str(tmp_path))(images)
    for instances, mine, image in zip(eager, detections, images):
        expected = instances.pred_masks.numpy()
        assert mine.masks.shape == expected.shape == (10, *image.shape[:2])
        assert 0.05 < expected.mean() < 0.95
        assert (mine.masks != expected).mean() < 1e-3  # pixels at the threshold may differ
        np.testing.assert_allclose(mine.scores, instances.scores.numpy(), atol=1e-4)
        kept = mine.confident(float(np.median(mine.scores)))
        assert kept.masks.shape[0] == len(kept) >= 5
    assert_predict_onnx_writes_the_masks(tmp_path, images, eager)


def assert_predict_onnx_writes_the_masks(tmp_path, images, eager):
    """tools/predict_onnx.py (torch-free) writes each query's mask as RLE "segmentation",
    equal to the eager model's pred_masks (as tools/demo.py writes them) but for pixels at
    the threshold."""
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"image{index}.png")
    run = run_torch_free("predict_onnx.py", "--model-dir", tmp_path, "--input", *sorted(tmp_path.glob("image*.png")),
                         "--output", tmp_path / "predicted", "--confidence-threshold", "0")
    assert run.returncode == 0 and "IMPORTED: []" in run.stdout, run.stdout + run.stderr
    records = json.loads((tmp_path / "predicted" / "predictions.json").read_text())
    for index, instances in enumerate(eager):
        masks = [mask_util.decode(r["segmentation"]) for r in records if r["file_name"].endswith(f"image{index}.png")]
        expected = instances.pred_masks.numpy()
        assert np.stack(masks).shape == expected.shape
        assert (np.stack(masks).astype(bool) != expected).mean() < 1e-3
