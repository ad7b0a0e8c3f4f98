"""MODEL.MASK_ON exports: the graph also returns mask logits, verification compares the
binary masks, the ONNX predictor turns them into masks of the original images."""
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog

from detr_d2.engine.build import build_model
from detr_d2.export import ExportRequest, export_model
from detr_d2.export.verification import verification_images
from detr_d2.utils.predictor import BatchPredictor
from detr_d2_deploy.predictor import OnnxDetrPredictor
from tests.helpers import save_weights, tiny_cfg

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
