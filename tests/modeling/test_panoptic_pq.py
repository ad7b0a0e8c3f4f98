"""The panoptic output goes through detectron2's COCOPanopticEvaluator and panopticapi's
pq_compute as it is, and the official metric sees detr_d2's post-processing and the
reference's as the same segmentation: the reference's hand-made results (fixture
detr_upstream_segm_tiny), written as COCO-panoptic ground truth, score PQ 100 against
detr_d2's output for the same model outputs, and less once a segment is missing."""
import json

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from PIL import Image

from detr_d2.modeling.panoptic import panoptic_segmentation
from tests.helpers import fixture_dir

CASES = (0, 1, 2, 3, 5)  # case 4 keeps nothing: no segment to score
DATASET_ID_OFFSET = 10  # dataset category id = contiguous id + 10 (not contiguous ids)


def id_rgb(ids):
    ids = np.asarray(ids, dtype=np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    """(dataset name registered with the reference's results as ground truth, our outputs,
    the evaluator inputs)."""
    path = fixture_dir("detr_upstream_segm_tiny")
    made = torch.load(path / "inputs.pt", weights_only=True)["panoptic_handmade"]
    expected = torch.load(path / "expected.pt", weights_only=True)["panoptic_handmade"]
    things = set(made["thing_ids"])
    is_thing = [c in things for c in range(6)]
    root = tmp_path_factory.mktemp("panoptic_pq")
    (root / "gt").mkdir()
    images, annotations, inputs, outputs = [], [], [], []
    for case in CASES:
        height, width = made["target_sizes"][case]
        reference = expected[case]
        # the reference numbers segments from 0, which is VOID in COCO-panoptic files: +1
        Image.fromarray(id_rgb(reference["id_map"].numpy() + 1)).save(root / "gt" / f"case{case}.png")
        images.append({"id": case + 1, "file_name": f"case{case}.jpg", "height": height, "width": width})
        annotations.append({"image_id": case + 1, "file_name": f"case{case}.png", "segments_info": [
            {"id": s["id"] + 1, "category_id": s["category_id"] + DATASET_ID_OFFSET, "iscrowd": 0,
             "area": s["area"], "bbox": [0, 0, 1, 1]} for s in reference["segments_info"]]})
        inputs.append({"file_name": f"case{case}.jpg", "image_id": case + 1})
        outputs.append({"panoptic_seg": panoptic_segmentation(
            made["pred_logits"][case], made["pred_masks"][case], made["processed_sizes"][case],
            (height, width), is_thing, made["threshold"])})
    categories = [{"id": c + DATASET_ID_OFFSET, "name": f"class{c}", "isthing": int(is_thing[c])} for c in range(6)]
    gt_json = root / "panoptic_gt.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    name = "panoptic_pq_test_hand_made"
    MetadataCatalog.get(name).set(
        panoptic_root=str(root / "gt"), panoptic_json=str(gt_json), evaluator_type="coco_panoptic_seg",
        thing_dataset_id_to_contiguous_id={c + DATASET_ID_OFFSET: c for c in range(6) if is_thing[c]},
        stuff_dataset_id_to_contiguous_id={c + DATASET_ID_OFFSET: c for c in range(6) if not is_thing[c]})
    return name, inputs, outputs


def evaluate(name, inputs, outputs):
    evaluator = COCOPanopticEvaluator(name)
    evaluator.reset()
    # the evaluator pops "isthing" from the dicts it is given: hand it copies
    evaluator.process(inputs, [{"panoptic_seg": (seg, [dict(s) for s in info])}
                               for seg, info in (o["panoptic_seg"] for o in outputs)])
    return evaluator.evaluate()["panoptic_seg"]


def test_detr_d2_output_scores_pq_100_against_the_references(hand_made):
    name, inputs, outputs = hand_made
    result = evaluate(name, inputs, outputs)
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert result[key] == pytest.approx(100.0), (key, result)


def test_a_missing_segment_lowers_pq(hand_made):
    """Sanity check of the comparison: the first case without its first segment (pixels
    set to 0, no segment) is no longer a perfect match."""
    name, inputs, outputs = hand_made
    seg, segments_info = outputs[0]["panoptic_seg"]
    dropped = segments_info[0]["id"]
    changed = [{"panoptic_seg": (torch.where(seg == dropped, 0, seg), segments_info[1:])}, *outputs[1:]]
    result = evaluate(name, inputs, changed)
    assert result["PQ"] < 100.0 and result["RQ"] < 100.0
