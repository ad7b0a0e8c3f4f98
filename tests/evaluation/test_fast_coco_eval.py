"""TEST.COCO_EVAL_IMPL: detectron2's COCOEvaluator with the fast COCOeval (faster-coco-eval
where detectron2 has no compiled ops) and with the official pycocotools one give the same
AP tables, per-category APs included, for boxes and masks, on generated data with many
images, crowd objects, images without objects and several categories."""
import json

import pycocotools.mask as mask_utils
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import coco_evaluation
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.logger import create_small_table

from detr_d2 import compat
from detr_d2.evaluation import FasterCOCOeval, detection_evaluator
from detr_d2.evaluation.synthetic_coco import synthetic_detections, synthetic_ground_truth
from tests.helpers import tiny_cfg

MAIN_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def model_outputs(ground_truth, detections, metadata):
    """(inputs, outputs) as a model would give them for ``detections`` (COCO results): boxes
    xyxy, contiguous classes, and with "segmentation" the decoded masks as pred_masks."""
    contiguous = metadata.thing_dataset_id_to_contiguous_id
    per_image = {image["id"]: [] for image in ground_truth["images"]}
    for detection in detections:
        per_image[detection["image_id"]].append(detection)
    sizes = {image["id"]: (image["height"], image["width"]) for image in ground_truth["images"]}
    inputs, outputs = [], []
    for image_id, found in per_image.items():
        boxes = BoxMode.convert(torch.tensor([d["bbox"] for d in found]), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        instances = Instances(sizes[image_id], pred_boxes=Boxes(boxes), scores=torch.tensor([d["score"] for d in found]),
                              pred_classes=torch.tensor([contiguous[d["category_id"]] for d in found]))
        if "segmentation" in found[0]:
            masks = mask_utils.decode([d["segmentation"] for d in found])  # [H, W, N]
            instances.pred_masks = torch.from_numpy(masks).permute(2, 0, 1).to(torch.bool)
        inputs.append({"image_id": image_id})
        outputs.append({"instances": instances})
    return inputs, outputs


@pytest.mark.parametrize("iou_type, images, per_image, seed", [("bbox", 300, 30, 2), ("segm", 20, 8, 3)])
def test_fast_and_official_give_the_same_ap_tables(tmp_path, iou_type, images, per_image, seed):
    with_masks = iou_type == "segm"
    ground_truth = synthetic_ground_truth(images, num_categories=6, crowd_fraction=0.05, empty_fraction=0.15,
                                          with_masks=with_masks, seed=seed)
    assert any(a["iscrowd"] for a in ground_truth["annotations"])
    assert len({a["image_id"] for a in ground_truth["annotations"]}) < images  # some without objects
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    name = f"fast_vs_official_{iou_type}"
    register_coco_instances(name, {}, str(tmp_path / "gt.json"), str(tmp_path))
    DatasetCatalog.get(name)  # detectron2's loader sets the category id mapping
    inputs, outputs = model_outputs(ground_truth, synthetic_detections(ground_truth, per_image, with_masks, seed=seed + 1),
                                    MetadataCatalog.get(name))
    results = {}
    for impl in ("official", "fast"):
        cfg = tiny_cfg("TEST.COCO_EVAL_IMPL", impl, "MODEL.MASK_ON", with_masks)
        evaluator = detection_evaluator(cfg, name, str(tmp_path / impl))
        evaluator.reset()
        evaluator.process(inputs, outputs)
        results[impl] = evaluator.evaluate()
    if not compat.has_compiled_ops():
        assert coco_evaluation.COCOeval_opt is FasterCOCOeval
    assert set(results["fast"]) == set(results["official"]) == ({"bbox", "segm"} if with_masks else {"bbox"})
    for task, official in results["official"].items():
        fast = results["fast"][task]
        assert set(fast) == set(official) and len(official) == len(MAIN_METRICS) + 6  # + AP per category
        assert fast == pytest.approx(official, abs=1e-9, nan_ok=True), task
        assert official["AP"] > 5
        tables = [create_small_table({k: r[task][k] for k in MAIN_METRICS}) for r in (results["fast"], results["official"])]
        assert tables[0] == tables[1]
