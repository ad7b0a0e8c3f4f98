"""The two-stage mask recipe through tools/train_net.py on COCO-json data with masks
(polygons and RLE): a box model is trained, then MODEL.MASK_ON with
MODEL.DETR.FROZEN_WEIGHTS trains only the mask head (the detector's tensors in the final
checkpoint equal the box model's) and the evaluation reports COCO bbox and segm AP."""
import pytest
import torch

from tests.helpers import TINY_CONFIG, assert_succeeded, read_metrics, run_train_net, write_coco_split

MASK_SIZES = ("MODEL.DETR.HIDDEN_DIM", 128, "MODEL.DETR.NHEADS", 8)


def register(tmp_path):
    """KEY VALUE options registering a 2-image COCO set with masks for training and test."""
    write_coco_split(tmp_path / "coco", "train", num_images=2, seed=0, with_masks=True)
    entry = f"(('masks_train', '{tmp_path}/coco/annotations/instances_train.json', '{tmp_path}/coco/train'),)"
    return ("DATASETS.REGISTER_COCO", entry, "DATASETS.TRAIN", "('masks_train',)",
            "DATASETS.TEST", "('masks_train',)")


def train(data_opts, tmp_path, output_dir, *opts):
    return run_train_net(["--config-file", TINY_CONFIG, "OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", 2,
                          *data_opts, *MASK_SIZES, *opts], tmp_path, timeout=600)


@pytest.mark.slow
def test_frozen_detector_mask_training_keeps_the_detector_and_evaluates_segm(tmp_path):
    boxes_dir, masks_dir = tmp_path / "boxes", tmp_path / "masks"
    data_opts = register(tmp_path)
    assert_succeeded(train(data_opts, tmp_path, boxes_dir))
    detector = torch.load(boxes_dir / "model_final.pth", weights_only=True)["model"]
    result = train(data_opts, tmp_path, masks_dir, "MODEL.MASK_ON", True, "MODEL.DETR.FROZEN_WEIGHTS",
                   boxes_dir / "model_final.pth")
    assert_succeeded(result)
    log = (masks_dir / "log.txt").read_text()
    assert "detector loaded from" in log and "training only the mask head" in log
    trained = torch.load(masks_dir / "model_final.pth", weights_only=True)["model"]
    assert set(trained) - set(detector) == {k for k in trained if k.startswith("mask_head.")}
    for name, value in detector.items():
        assert torch.equal(trained[name], value), f"frozen tensor {name} changed"
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    final = read_metrics(masks_dir)[-1]
    assert "segm/AP" in final and "bbox/AP" in final
    train_rows = [row for row in read_metrics(masks_dir) if "total_loss" in row]
    assert "loss_mask" in train_rows[-1] and "loss_dice" in train_rows[-1]
