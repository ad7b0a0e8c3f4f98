"""Exports of the sigmoid top-k DETRs: a tiny DeformableDetr (two-stage + box refinement,
configs/tests/tiny_deformable.yaml) and a tiny Dino, random weights. ONNX with --verify,
run by tools/predict_onnx.py where torch cannot be imported, gives the eager model's
top-k detections; TorchScript verifies and runs new sizes and batches."""
import json

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from PIL import Image

from detr_d2 import add_detr_config
from detr_d2.data import resolve_num_classes
from detr_d2.engine import merge_config
from detr_d2.engine.build import build_model
from detr_d2.export import ExportableDetr, ExportRequest, export_model
from detr_d2.export.verification import example_batch, verification_images
from detr_d2.utils.predictor import BatchPredictor
from detr_d2_deploy.spec import read_spec
from tests.helpers import REPO, run_torch_free, save_weights

ARCHITECTURES = {
    "DeformableDetr": ("MODEL.MULTI_SCALE.WITH_BOX_REFINE", "True", "MODEL.MULTI_SCALE.TWO_STAGE", "True"),
    "Dino": ("MODEL.META_ARCHITECTURE", "Dino"),
}
TOPK = 20  # tiny_deformable.yaml's MODEL.MULTI_SCALE.TOPK_DETECTIONS, of 10 queries x 80 classes
IMAGE_SIZES = [(150, 211), (233, 171), (97, 131)]  # resized to a shortest edge of 128 by both sides


def tiny_multi_scale_cfg(architecture):
    cfg = merge_config(add_detr_config(get_cfg()), str(REPO / "configs" / "tests" / "tiny_deformable.yaml"),
                       list(ARCHITECTURES[architecture]))
    resolve_num_classes(cfg)
    return cfg


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny(request, tmp_path_factory):
    """(config with MODEL.WEIGHTS, eval model with random weights, folder) per architecture."""
    folder = tmp_path_factory.mktemp(request.param)
    cfg = tiny_multi_scale_cfg(request.param)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cfg.MODEL.WEIGHTS = str(save_weights(model, folder / "weights.pth"))
    return cfg, model, folder


@pytest.fixture(scope="module")
def onnx_export(tiny):
    """(export folder, export.json object, passed) of the ONNX export with --verify."""
    cfg, model, folder = tiny
    description, passed = export_model(model, cfg, "tiny_deformable.yaml", MetadataCatalog.get("coco_2017_train"),
                                       ExportRequest("onnx", str(folder), verify=True))
    return folder, description, passed


def assert_verified(description, passed):
    assert passed and description["verification"]["passed"]
    batches = description["verification"]["batches"]
    assert [len(batch["sizes"]) for batch in batches] == [1, 1, 1, 2]
    assert all(b["box"] <= 1e-4 and b["score"] <= 1e-4 and b["label_mismatches"] == 0 for b in batches)


@pytest.mark.slow  # the dynamo exporter takes about 20 s per tiny model on 2 cores
def test_onnx_export_verifies_and_says_sigmoid_topk(onnx_export):
    folder, description, passed = onnx_export
    assert_verified(description, passed)
    assert description["postprocessing"]["classification"] == "sigmoid_topk"
    assert description["postprocessing"]["topk"] == TOPK
    assert [o["shape"] for o in description["outputs"]] == [["batch", 10, 80], ["batch", 10, 4]]
    assert json.loads((folder / "export.json").read_text()) == description
    assert read_spec(folder).topk == TOPK


def paired_records(mine, expected):
    """Each expected record with the record of ``mine`` of its file and class whose box is
    nearest (near-equal scores may trade ranks)."""
    pairs = []
    unused = list(mine)
    for wanted in expected:
        candidates = [r for r in unused if (r["file_name"], r["category_id"]) == (wanted["file_name"],
                                                                               wanted["category_id"])]
        assert candidates, wanted
        nearest = min(candidates, key=lambda r: np.abs(np.subtract(r["bbox"], wanted["bbox"])).max())
        unused.remove(nearest)
        pairs.append((nearest, wanted))
    return pairs


def eager_records(cfg, paths, images, category_ids):
    """tools/demo.py's records of the eager model (BatchPredictor) on ``images``, two per
    batch as the predictor runs them, every detection."""
    predictor = BatchPredictor(cfg)
    records = []
    for start in range(0, len(images), 2):
        for path, instances in zip(paths[start:start + 2], predictor(images[start:start + 2])):
            for (x0, y0, x1, y1), score, label in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                                      instances.pred_classes.tolist()):
                records.append({"file_name": str(path), "category_id": category_ids[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return records


@pytest.mark.slow
def test_torch_free_predictor_gives_the_eager_topk_detections(onnx_export, tiny, tmp_path):
    folder = onnx_export[0]
    images = verification_images(IMAGE_SIZES, seed=4)
    paths = [tmp_path / f"image{index}.png" for index in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    run = run_torch_free("predict_onnx.py", "--model-dir", folder, "--input", *paths, "--output", tmp_path / "out",
                         "--confidence-threshold", "0", "--batch-size", "2")
    assert run.returncode == 0 and "IMPORTED: []" in run.stdout, run.stdout + run.stderr
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    expected = eager_records(tiny[0], paths, images, read_spec(folder).category_ids)
    assert len(records) == len(expected) == TOPK * len(images)
    sides = {str(path): np.array([width, height] * 2) for path, (height, width) in zip(paths, IMAGE_SIZES)}
    for mine, wanted in paired_records(records, expected):
        assert abs(mine["score"] - wanted["score"]) <= 1e-4
        assert np.all(np.abs(np.subtract(mine["bbox"], wanted["bbox"])) <= 1e-4 * sides[mine["file_name"]])


def test_torchscript_export_verifies_and_runs_new_sizes_and_batches(tiny, tmp_path):
    cfg, model, _ = tiny
    description, passed = export_model(model, cfg, "tiny_deformable.yaml", MetadataCatalog.get("coco_2017_train"),
                                       ExportRequest("torchscript", str(tmp_path), verify=True))
    assert_verified(description, passed)
    assert description["postprocessing"]["classification"] == "sigmoid_topk"
    module = torch.jit.load(str(tmp_path / "model.ts"))
    images, sizes = example_batch(verification_images([(101, 77), (66, 140), (90, 90)], seed=5), read_spec(tmp_path))
    with torch.no_grad():
        expected = ExportableDetr(model)(images, sizes)
        logits, boxes = module(images, sizes)
    assert logits.shape == (3, 10, 80)
    torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected[1], atol=1e-5, rtol=0)
