"""DETR's criterion on the test set (TEST.EVAL_LOSSES): real train_net runs on tiny generated
COCO data, compared with the criterion run by hand on the same one-image batches."""
import json

import pytest
import torch
from detectron2.data.datasets import load_coco_json

from detr_d2.data import DetrDatasetMapper
from detr_d2.evaluation.validation_losses import average_over_images, validation_statistics
from tests.helpers import (
    assert_succeeded,
    read_metrics,
    run_concurrently,
    save_weights,
    tiny_cfg,
    tiny_model,
    train_net,
    write_coco_split,
)

AUX = ("MODEL.DETR.DEC_LAYERS", 2)  # one auxiliary decoder layer: the _0 terms appear
VAL_IMAGES = 5  # split 3 + 2 over two processes
REFERENCE_NAMES = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0",
                   "class_error", "cardinality_error", "cardinality_error_0", "loss_ce_unscaled",
                   "loss_bbox_unscaled", "loss_giou_unscaled", "class_error_unscaled",
                   "cardinality_error_unscaled", "loss_ce_0_unscaled", "loss_bbox_0_unscaled",
                   "loss_giou_0_unscaled", "cardinality_error_0_unscaled")


@pytest.fixture(scope="module")
def evaluation_root(tmp_path_factory):
    """$DETECTRON2_DATASETS with coco/train2017 (2 images) and coco/val2017 (5 images), and
    the weights of a randomly initialised tiny model with 2 decoder layers."""
    root = tmp_path_factory.mktemp("evaluation_datasets")
    write_coco_split(root / "coco", "train2017", num_images=2, seed=0)
    write_coco_split(root / "coco", "val2017", num_images=VAL_IMAGES, seed=3)
    save_weights(tiny_model(*AUX), root / "weights.pth")
    return root


def eval_only(root, output_dir, *opts, flags=()):
    return train_net("--eval-only", *flags, "MODEL.WEIGHTS", root / "weights.pth", "OUTPUT_DIR", output_dir,
                     *AUX, *opts)


def validation_report(output_dir):
    return json.loads((output_dir / "inference" / "validation_losses_coco_2017_val.json").read_text())


def criterion_by_hand(root):
    """The reference's averaged statistics computed here: each val image mapped as the test
    loader maps it, fed alone (one-image batches, as the test loader batches), the criterion
    called on it, the values averaged over the images, weighted by weight_dict."""
    model = tiny_model(*AUX)
    model.load_state_dict(torch.load(root / "weights.pth", weights_only=True)["model"])
    model.eval()
    mapper = DetrDatasetMapper(tiny_cfg(*AUX), is_train=False, with_instances=True)
    records = load_coco_json(str(root / "coco/annotations/instances_val2017.json"), str(root / "coco/val2017"),
                             "validation_losses_by_hand")
    per_image = []
    with torch.no_grad():
        for record in records:
            batch = [mapper(record)]
            images = model.preprocess_image(batch)
            values = model.criterion(*model.predict(images), model.prepare_targets(batch, images.image_sizes))
            per_image.append({name: value.item() for name, value in values.items()})
    means = {name: sum(image[name] for image in per_image) / len(per_image) for name in per_image[0]}
    weights = model.criterion.weight_dict
    expected = {"loss": sum(weights[name] * value for name, value in means.items() if name in weights)}
    for name, value in means.items():
        expected[name] = weights.get(name, 1.0) * value
        expected[f"{name}_unscaled"] = value
    return expected


@pytest.fixture(scope="module")
def evaluations(evaluation_root, tmp_path_factory):
    """Folder holding "on" and "off": OUTPUT_DIRs of --eval-only runs with TEST.EVAL_LOSSES
    (the default) and without (asserted to have succeeded)."""
    root = tmp_path_factory.mktemp("evaluations")
    runs = run_concurrently([eval_only(evaluation_root, root / "on"),
                             eval_only(evaluation_root, root / "off", "TEST.EVAL_LOSSES", False)],
                            evaluation_root)
    for run in runs:
        assert_succeeded(run)
    return root


def test_eval_only_prints_and_stores_the_criterion_averaged_as_by_hand(evaluation_root, evaluations):
    report = validation_report(evaluations / "on")
    assert report["images"] == VAL_IMAGES
    statistics = report["statistics"]
    assert set(statistics) == set(REFERENCE_NAMES)
    expected = criterion_by_hand(evaluation_root)
    for name, value in expected.items():
        assert statistics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    log = (evaluations / "on" / "log.txt").read_text()
    header = "DETR criterion on coco_2017_val (5 images, mean per image):"
    assert log.index("Evaluation results for bbox") < log.index(header)  # after the AP table
    table = log[log.index(header):].splitlines()[1:16]
    row = next(line for line in table if line.startswith("| loss_bbox_0 "))
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "loss_bbox_0", f"{statistics['loss_bbox_0']:.4f}", f"{statistics['loss_bbox_0_unscaled']:.4f}", "5"]
    assert "copypaste: Task: val" in log
    assert not (evaluations / "off" / "inference" / "validation_losses_coco_2017_val.json").exists()
    assert "DETR criterion" not in (evaluations / "off" / "log.txt").read_text()


def test_periodic_evaluation_writes_val_metrics_at_the_evaluated_iterations(evaluation_root, tmp_path):
    """EVAL_PERIOD 2 of 4 iterations: detectron2's EvalHook evaluates after iteration index 1
    and after training (stored at iteration 4); val/ scalars go beside bbox/AP."""
    run = run_concurrently([train_net("SOLVER.MAX_ITER", 4, "TEST.EVAL_PERIOD", 2, "OUTPUT_DIR", tmp_path,
                                      *AUX)], evaluation_root)[0]
    assert_succeeded(run)
    rows = read_metrics(tmp_path)
    evaluated = [row["iteration"] for row in rows if "bbox/AP" in row]
    validated = [row for row in rows if "val/loss" in row]
    assert evaluated == [row["iteration"] for row in validated] == [1, 4]
    for row in validated:
        assert {f"val/{name}" for name in REFERENCE_NAMES} <= set(row)
        assert row["val/loss"] == pytest.approx(sum(row[f"val/{name}"] for name in REFERENCE_NAMES[1:7]))
    progress = [line for line in (tmp_path / "log.txt").read_text().splitlines() if " iter: 3 " in line]
    assert progress and "val/" not in progress[-1]  # the console line keeps to training values


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(evaluation_root, evaluations, tmp_path):
    run = run_concurrently([eval_only(evaluation_root, tmp_path / "two",
                                      flags=("--num-gpus", 2, "--dist-url", "auto"))], evaluation_root)[0]
    assert_succeeded(run)
    assert "World size: 2" in (tmp_path / "two" / "log.txt").read_text()
    one, two = validation_report(evaluations / "on"), validation_report(tmp_path / "two")
    assert one["images"] == two["images"] == VAL_IMAGES
    assert two["statistics"] == pytest.approx(one["statistics"], rel=1e-6)


def test_statistics_follow_the_reference_names_and_weights():
    per_image = [{"loss_ce": 1.0, "loss_bbox": 0.2, "class_error": 100.0, "loss_ce_0": 2.0},
                 {"loss_ce": 3.0, "loss_bbox": 0.4, "class_error": 0.0, "loss_ce_0": 4.0}]
    averages = average_over_images(per_image)
    assert averages == {"loss_ce": 2.0, "loss_bbox": pytest.approx(0.3), "class_error": 50.0, "loss_ce_0": 3.0}
    statistics = validation_statistics(averages, {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_ce_0": 1.0})
    assert list(statistics)[:4] == ["loss", "loss_ce", "loss_bbox", "loss_ce_0"]  # last layer first
    assert statistics["loss"] == pytest.approx(2.0 + 1.5 + 3.0)
    assert statistics["loss_bbox"] == pytest.approx(1.5) and statistics["loss_bbox_unscaled"] == pytest.approx(0.3)
    assert statistics["class_error"] == statistics["class_error_unscaled"] == 50.0
