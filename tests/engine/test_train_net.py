"""tools/train_net.py end to end: real CLI runs in subprocesses on tiny generated data.

Data: see conftest.py (two 128x128 images per split, laid out as COCO under a temporary
$DETECTRON2_DATASETS, so the builtin names coco_2017_train / coco_2017_val point at it).
Model: configs/tests/tiny.yaml (ResNet-18 from scratch, 1+1 transformer layers).
"""
import re
import shutil

import pytest
import torch

from tests.helpers import REPO, TINY_CONFIG, read_metrics, run_python, run_train_net, trains_in_subprocess

TRAIN_METRICS = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error",
                 "lr", "time", "data_time", "total_loss")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DDP_SCRIPT = REPO / "tests" / "engine" / "ddp_two_process_train.py"


def assert_succeeded(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def bbox_results(log_text):
    """The last bbox AP row that detectron2's ``print_csv_format`` logged: {key: float}."""
    rows = re.findall(r"copypaste: Task: bbox\n.*copypaste: (\S+)\n.*copypaste: (\S+)", log_text)
    assert rows, "no bbox evaluation in the log"
    keys, values = rows[-1]
    return dict(zip(keys.split(","), map(float, values.split(","))))


def train_tiny(datasets_root, output_dir, *opts, args=()):
    return run_train_net(["--config-file", TINY_CONFIG, *args, "OUTPUT_DIR", output_dir, *opts],
                         datasets_root)


# 6 iterations, a checkpoint after iteration index 2, the LR dropped x0.1 at 4, evaluated
# on coco_2017_val at the end: the short training, and the run that resuming must repeat.
STRAIGHT_OPTS = ["SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3, "SOLVER.STEPS", "(4,)"]


@pytest.fixture(scope="module")
@trains_in_subprocess
def straight_run(datasets_root, tmp_path_factory):
    """OUTPUT_DIR of the tiny model trained STRAIGHT_OPTS (asserted to have succeeded)."""
    output_dir = tmp_path_factory.mktemp("straight")
    assert_succeeded(train_tiny(datasets_root, output_dir, *STRAIGHT_OPTS))
    return output_dir


def test_short_training_writes_checkpoints_metrics_and_evaluation(straight_run):
    output_dir = straight_run
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    checkpoint = torch.load(output_dir / "model_final.pth", weights_only=True)
    assert checkpoint["iteration"] == 5 and "optimizer" in checkpoint["trainer"]["_trainer"]
    assert not list(output_dir.glob(".*.tmp")), "a temporary checkpoint file was left behind"
    assert list(output_dir.glob("events.out.tfevents.*")), "no TensorBoard events"

    train_rows = [row for row in read_metrics(output_dir) if "total_loss" in row]
    assert set(TRAIN_METRICS) <= set(train_rows[-1]), train_rows[-1]
    log = (output_dir / "log.txt").read_text()
    console_line = [line for line in log.splitlines() if " iter: 5 " in line][-1]
    for name in TRAIN_METRICS:
        assert f"{name}: " in console_line, console_line

    assert "Evaluation results for bbox" in log and "|  AP   |  AP50  |" in log
    assert set(AP_KEYS) <= set(bbox_results(log))
    assert "bbox/AP" in read_metrics(output_dir)[-1]


@pytest.fixture(scope="module")
@trains_in_subprocess
def overfit_run(datasets_root, tmp_path_factory):
    """Train the tiny model on the 2 training images and evaluate it on the same images.

    120 iterations at LR 1e-3, the from-scratch backbone included (multiplier 1): with
    SEED 0-3 the AP50 on these images reached 100 by iteration 120 (by 80 for three of
    them) and the total loss fell below 10% of its start (measured). Returns the run's
    OUTPUT_DIR.
    """
    output_dir = tmp_path_factory.mktemp("overfit")
    result = train_tiny(datasets_root, output_dir, "SOLVER.MAX_ITER", 120,
                        "SOLVER.BACKBONE_MULTIPLIER", 1.0, "DATASETS.TEST", "('coco_2017_train',)")
    assert_succeeded(result)
    return output_dir


def test_overfits_two_images(overfit_run):
    losses = [row["total_loss"] for row in read_metrics(overfit_run) if "total_loss" in row]
    assert losses[-1] < 0.2 * losses[0], losses
    assert bbox_results((overfit_run / "log.txt").read_text())["AP50"] >= 90


def test_eval_only_reproduces_the_ap_of_training(overfit_run, datasets_root, tmp_path):
    eval_dir = tmp_path / "eval"
    result = train_tiny(datasets_root, eval_dir, "MODEL.WEIGHTS", overfit_run / "model_final.pth",
                        "DATASETS.TEST", "('coco_2017_train',)", args=["--eval-only"])
    assert_succeeded(result)
    trained = bbox_results((overfit_run / "log.txt").read_text())
    evaluated = bbox_results((eval_dir / "log.txt").read_text())
    assert evaluated == pytest.approx(trained, nan_ok=True)


def test_resume_gives_the_same_weights_and_lr_as_straight_training(straight_run, datasets_root, tmp_path):
    """6 iterations straight vs 3, stop, ``--resume`` to 6 (LR drop at 4 in between).

    Batches do not depend on sampling order: each holds the whole (2-image) training set,
    without flip or crop, and dropout is 0. The stop after 3 iterations is the checkpoint
    the straight run wrote at that point (CHECKPOINT_PERIOD 3), copied alone into a fresh
    OUTPUT_DIR, i.e. what an interrupted run leaves behind.
    """
    straight, resumed = straight_run, tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "model_0000002.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    result = train_tiny(datasets_root, resumed, *STRAIGHT_OPTS, args=["--resume"])
    assert_succeeded(result)
    assert "Starting training from iteration 3" in (resumed / "log.txt").read_text()

    expected = torch.load(straight / "model_final.pth", weights_only=True)
    actual = torch.load(resumed / "model_final.pth", weights_only=True)
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(actual["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    lrs = [[g["lr"] for g in c["trainer"]["_trainer"]["optimizer"]["param_groups"]]
           for c in (expected, actual)]
    assert lrs[0] == lrs[1] and lrs[0][0] == pytest.approx(1e-4)  # 1e-3 dropped x0.1
    last_lrs = [[row for row in read_metrics(run) if "lr" in row][-1]["lr"] for run in (straight, resumed)]
    assert last_lrs[0] == last_lrs[1]


@pytest.mark.slow
def test_two_cpu_processes_train_with_ddp_and_keep_identical_weights(datasets_root, tmp_path):
    result = run_python([DDP_SCRIPT, tmp_path], datasets_root)
    assert_succeeded(result)
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    assert all(rank["ddp"] and rank["world_size"] == 2 for rank in ranks)
    initial = ranks[0]["initial"]
    for name, tensor in ranks[0]["model"].items():
        assert torch.equal(tensor, ranks[1]["model"][name]), name
    assert any(not torch.equal(ranks[0]["model"][k], initial[k]) for k in initial), "did not train"


@pytest.mark.slow
def test_cli_starts_two_cpu_processes(datasets_root, tmp_path):
    output_dir = tmp_path / "out"
    result = train_tiny(datasets_root, output_dir, "SOLVER.MAX_ITER", 3,
                        args=["--num-gpus", 2, "--dist-url", "auto"])
    assert_succeeded(result)
    log = (output_dir / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert (output_dir / "log.txt.rank1").exists() and (output_dir / "model_final.pth").exists()
    assert "Evaluation results for bbox" in log


# ---------------------------------------------------------------- clear errors
def assert_clear_error(result, *culprits):
    """Non-zero exit; the output names every culprit; no traceback at all."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    for culprit in culprits:
        assert culprit in output, f"{culprit!r} not named in:\n{output[-2000:]}"
    assert "Traceback" not in output, output[-3000:]


def test_unregistered_dataset_name_is_reported_with_close_names(datasets_root, tmp_path):
    result = train_tiny(datasets_root, tmp_path, "DATASETS.TRAIN", "('coco_2017_trian',)")
    assert_clear_error(result, "coco_2017_trian", "coco_2017_train", "DATASETS.REGISTER_COCO")


@pytest.fixture
def broken_datasets_root(datasets_root, tmp_path):
    """A copy of the data whose coco_2017_train misses an image and whose val json is cut."""
    root = tmp_path / "broken"
    shutil.copytree(datasets_root, root)
    (root / "coco" / "train2017" / "000002.png").unlink()
    val_json = root / "coco" / "annotations" / "instances_val2017.json"
    val_json.write_text(val_json.read_text()[:100])
    return root


def test_missing_image_file_is_reported(broken_datasets_root, tmp_path):
    result = train_tiny(broken_datasets_root, tmp_path / "out", "DATASETS.TEST", "()")
    assert_clear_error(result, "000002.png", "coco_2017_train")


def test_unparsable_annotation_json_is_reported(broken_datasets_root, tmp_path):
    result = train_tiny(broken_datasets_root, tmp_path / "out",
                        "DATASETS.TRAIN", "('coco_2017_val',)")
    assert_clear_error(result, "instances_val2017.json", "not valid JSON")
