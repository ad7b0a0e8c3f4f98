"""tools/sweep_panoptic_threshold.py, run as a real subprocess on the converted reference
DETRsegm fixture (6 classes) and generated panoptic shapes (3 things + 3 stuff): its PQ at
each threshold is what detectron2's COCOPanopticEvaluator gives the model built with that
PANOPTIC_THRESHOLD; ``--register`` scores another split; wrong input is refused by name."""
import json

import pytest
import torch
from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset

from detr_d2.data.shapes import generate_panoptic_dataset
from detr_d2.engine import AtomicDetectionCheckpointer, Trainer, build_config
from detr_d2.evaluation.panoptic_thresholds import PanopticAtThresholds
from detr_d2.modeling.panoptic import PanopticPostProcess
from tests.helpers import REPO, assert_one_line_error, panoptic_fixture_config, run_one

THINGS = ("circle", "ellipse", "rectangle")
THRESHOLDS = (0.2, 0.35)  # the fixture's scores are low: the reference's 0.85 keeps nothing


@pytest.fixture(scope="module")
def panoptic_run(tmp_path_factory, converted_reference):
    """(config file, data folder): the fixture model with PANOPTIC_ON, its val split registered."""
    root = tmp_path_factory.mktemp("thresholds")
    cfg, data = panoptic_fixture_config(root, THINGS, {"val": 3, "tune": 2}, "sweep_val", converted_reference)
    cfg.DATASETS.TEST = ("sweep_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = str(root / "run")
    config = root / "panoptic.yaml"
    config.write_text(cfg.dump())
    return config, data


def sweep(config, *args):
    """The tool's run (``Run``: returncode, stdout, stderr, output)."""
    return run_one(["tools/sweep_panoptic_threshold.py", "--config-file", config, *args], REPO / "datasets")


def segments(predictions_json):
    """{image file: segments_info} of a COCOPanopticEvaluator's predictions.json, scores to 4 decimals
    (a subprocess and this process may differ in the last bits)."""
    return {a["file_name"]: [{**s, "score": round(s["score"], 4)} for s in a["segments_info"]]
            for a in json.loads(predictions_json.read_text())["annotations"]}


def evaluated_at(config, threshold, tmp_path):
    """COCOPanopticEvaluator's results for the model built with PANOPTIC_THRESHOLD ``threshold``;
    its predictions.json in tmp_path/eval_<threshold>."""
    cfg = build_config(str(config), ["MODEL.DETR.PANOPTIC_THRESHOLD", str(threshold), "TEST.EVAL_LOSSES", "False"])
    model = Trainer.build_model(cfg).eval()
    AtomicDetectionCheckpointer(model).load_for_inference(cfg.MODEL.WEIGHTS)
    evaluator = COCOPanopticEvaluator("sweep_val", str(tmp_path / f"eval_{threshold}"))
    return inference_on_dataset(model, Trainer.build_test_loader(cfg, "sweep_val"), evaluator)["panoptic_seg"]


@pytest.mark.slow
def test_pq_at_each_threshold_is_the_evaluation_at_that_threshold(panoptic_run, tmp_path):
    config, _ = panoptic_run
    output = tmp_path / "sweep"
    run = sweep(config, "--dataset", "sweep_val", "--thresholds", ",".join(map(str, THRESHOLDS)),
                "--output", str(output))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = json.loads((output / "thresholds.json").read_text())
    assert set(written["results"]) == {str(t) for t in THRESHOLDS}
    for threshold in THRESHOLDS:
        expected = evaluated_at(config, threshold, tmp_path)
        assert written["results"][str(threshold)] == pytest.approx(expected, abs=1e-9)
        swept = segments(output / f"threshold_{threshold}" / "predictions.json")
        assert swept == segments(tmp_path / f"eval_{threshold}" / "predictions.json")
    best = max(THRESHOLDS, key=lambda t: written["results"][str(t)]["PQ"])
    assert written["best_threshold"] == best and f"highest PQ at threshold {best}" in run.stdout
    low, high = (segments(output / f"threshold_{t}" / "predictions.json") for t in THRESHOLDS)
    assert low != high and all(high.values())  # the threshold changes the segments, and some are kept


def test_each_threshold_gives_the_post_processing_of_that_threshold():
    """The sweep's post-processing is PanopticPostProcess at each threshold, on the same outputs."""
    generator = torch.Generator().manual_seed(0)
    logits, mask_logits = torch.randn(20, 7, generator=generator) * 3, torch.randn(20, 24, 32, generator=generator)
    swept = PanopticAtThresholds([0, 1, 2], 6, (0.3, 0.6))(logits, mask_logits, (90, 120), (45, 60))
    for threshold in (0.3, 0.6):
        seg, segments = PanopticPostProcess([0, 1, 2], 6, threshold)(logits, mask_logits, (90, 120), (45, 60))
        assert torch.equal(swept[threshold][0], seg) and swept[threshold][1] == segments
    assert len(swept[0.3][1]) > len(swept[0.6][1]) > 0


@pytest.mark.slow
def test_register_scores_another_split_and_bad_input_is_named(panoptic_run, tmp_path):
    config, data = panoptic_run
    tune = [str(data / "annotations" / "panoptic_tune.json"), str(data / "panoptic" / "tune"),
            str(data / "images" / "tune")]
    run = sweep(config, "--dataset", "sweep_tune", "--register", *tune, "--thresholds", "0.3",
                "--output", str(tmp_path / "tune"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "sweep_tune" in run.stdout and (tmp_path / "tune" / "thresholds.json").exists()

    assert_one_line_error(sweep(config, "--dataset", "not_registered"), "not_registered", "--dataset", exit_code=2)
    other = tmp_path / "other"
    generate_panoptic_dataset(other, ("triangle", "pentagon", "hexagon"), {"val": 1}, seed=1)
    other_files = [str(other / "annotations" / "panoptic_val.json"), str(other / "panoptic" / "val"),
                   str(other / "images" / "val")]
    assert_one_line_error(sweep(config, "--dataset", "other_classes", "--register", *other_files),
                          "other_classes", "thing_classes", exit_code=2)
    bad = sweep(config, "--dataset", "sweep_val", "--thresholds", "0.5,1.5")
    assert bad.returncode == 2 and "--thresholds" in bad.stderr and "[0, 1)" in bad.stderr
