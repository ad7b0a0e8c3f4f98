"""The embedded demo pipeline (tools/run_demo.py) and the bundled checkpoint it starts from."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

BUNDLED = REPO / "checkpoints" / "shapes_detr_tiny.pth"


def test_bundled_checkpoint_is_slim_and_documented():
    checkpoint = torch.load(BUNDLED, weights_only=True, map_location="cpu")
    assert set(checkpoint) == {"model", "__author__"}
    assert checkpoint["model"]["class_embed.weight"].shape[0] == 7  # 6 pretraining shapes + no-object
    assert BUNDLED.stat().st_size <= 20 * 2 ** 20
    evaluations = [json.loads(line) for line in BUNDLED.with_suffix(".metrics.json").read_text().splitlines()
                   if "bbox/AP" in line]
    assert evaluations, "the bundled checkpoint's metrics.json records its evaluations"


def run_demo(output, data_dir, *extra):
    return subprocess.run(
        [sys.executable, "tools/run_demo.py", "--output", str(output), "--data-dir", str(data_dir),
         "--splits", "train:16,val:4", "--images", "2", *extra,
         "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_run_demo_end_to_end_on_a_small_custom_set(tmp_path):
    """A short run of the whole demo: data, fine-tune from the bundled checkpoint with the
    class head dropped, COCOEvaluator, Visualizer pictures, curves, summary; then the mask
    stage (--masks) on the frozen fine-tuned detector: segm evaluated, masks drawn."""
    output = tmp_path / "demo"
    assert "run `make demo` first" in run_demo(output, tmp_path / "data", "--masks").stderr
    result = run_demo(output, tmp_path / "data")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = output / "finetune"
    log = (run_dir / "log.txt").read_text()
    assert "class_embed" in log  # the 6-class head does not fit 2 classes and is reported skipped
    assert "NUM_CLASSES: 2" in (run_dir / "config.yaml").read_text()
    assert len(list((output / "predictions").glob("*.png"))) == 2
    assert (output / "curves.png").stat().st_size > 0
    assert "[demo] bbox AP" in result.stdout and "[demo] DETR fine-tuned" in result.stdout

    masks = run_demo(output, tmp_path / "data", "--masks")
    assert masks.returncode == 0, masks.stdout[-3000:] + masks.stderr[-3000:]
    assert "frozen" in (output / "masks" / "log.txt").read_text()
    assert "mask AP" in masks.stdout and "segm/AP" in (output / "masks" / "metrics.json").read_text()
    drawn = json.loads((output / "masks_predictions" / "predictions.json").read_text())
    assert all("segmentation" in record for record in drawn)
    assert len(list((output / "masks_predictions").glob("*.png"))) == 2
