"""PQ through detectron2's COCOPanopticEvaluator and the real panopticapi (panopticapi-lite,
installed without its numpy<2 pin): the ground truth scored against itself is 100, a
wrong category lowers exactly the part it belongs to."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOPanopticEvaluator

import detr_d2
from detr_d2.data import register_datasets_from_config
from detr_d2.data.panoptic_validation import read_panoptic_png
from detr_d2.data.shapes import PRESETS, generate_panoptic_dataset
from detr_d2.errors import SetupError
from detr_d2.evaluation import check_evaluator_types, detection_evaluator
from tests.helpers import REPO


@pytest.fixture(scope="module")
def panoptic_val(tmp_path_factory):
    """A registered 6-image panoptic shapes set (with a crowd segment and void pixels)."""
    root = tmp_path_factory.mktemp("panoptic_eval")
    generate_panoptic_dataset(root, PRESETS["panoptic"], {"val": 6}, seed=3)
    cfg = config()
    cfg.DATASETS.REGISTER_COCO_PANOPTIC = (("pq_val", str(root / "annotations/panoptic_val.json"),
                                            str(root / "panoptic/val"), str(root / "images/val")),)
    register_datasets_from_config(cfg)
    return "pq_val"


def config(*opts):
    cfg = detr_d2.add_detr_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "Base-DETR.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def ground_truth_outputs(record, relabel=None):
    """The record's ground truth as a model's ``panoptic_seg`` output: ids 1..N (0 void),
    segments with contiguous category_id and isthing; ``relabel`` maps segment index ->
    another contiguous category."""
    ids = read_panoptic_png(record["pan_seg_file_name"])
    seg = torch.zeros(ids.shape, dtype=torch.int32)
    segments = []
    for k, segment in enumerate(record["segments_info"], start=1):
        seg[torch.from_numpy(ids == segment["id"])] = k
        category = (relabel or {}).get(k - 1, segment["category_id"])
        segments.append({"id": k, "category_id": category, "isthing": segment["isthing"], "score": 1.0})
    return {"panoptic_seg": (seg, segments)}


def evaluate(name, tmp_path, relabel_first_stuff=False):
    evaluator = detection_evaluator(config("MODEL.MASK_ON", "True", "MODEL.DETR.PANOPTIC_ON", "True"), name,
                                    str(tmp_path))
    assert isinstance(evaluator, COCOPanopticEvaluator)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        relabel = None
        if relabel_first_stuff:
            index = next(i for i, s in enumerate(record["segments_info"]) if not s["isthing"])
            relabel = {index: 6 + (record["segments_info"][index]["category_id"] - 6 + 1) % 3}
        evaluator.process([record], [ground_truth_outputs(record, relabel)])
    return evaluator.evaluate()["panoptic_seg"]


def test_ground_truth_against_itself_is_pq_100(panoptic_val, tmp_path):
    records = DatasetCatalog.get(panoptic_val)
    assert any(s["iscrowd"] for r in records for s in r["segments_info"])
    assert any((read_panoptic_png(r["pan_seg_file_name"]) == 0).any() for r in records)  # void pixels
    results = evaluate(panoptic_val, tmp_path)
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert results[key] == pytest.approx(100.0), key
    assert (tmp_path / "predictions.json").is_file()


def test_a_wrong_stuff_category_lowers_stuff_pq_only(panoptic_val, tmp_path):
    results = evaluate(panoptic_val, tmp_path, relabel_first_stuff=True)
    assert results["PQ_th"] == pytest.approx(100.0)
    assert results["PQ_st"] < 90.0 and results["PQ"] < 100.0


def test_a_panoptic_test_set_needs_the_panoptic_output(panoptic_val):
    with pytest.raises(SetupError, match="pq_val.*MODEL.DETR.PANOPTIC_ON True"):
        check_evaluator_types([panoptic_val], cfg=config("MODEL.MASK_ON", "True"))
    check_evaluator_types([panoptic_val], cfg=config("MODEL.MASK_ON", "True", "MODEL.DETR.PANOPTIC_ON", "True"))
