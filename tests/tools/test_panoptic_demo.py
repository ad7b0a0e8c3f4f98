"""The synthetic panoptic demo pipeline (tools/run_panoptic_demo.py, `make demo-panoptic`)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SHORT = ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0"]


@pytest.mark.slow
def test_run_panoptic_demo_end_to_end_on_a_small_set(tmp_path):
    """A short run of the whole demo: panoptic data, the start checkpoint with the shapes'
    class rows kept, the box stage, the mask stage on the frozen detector evaluated by
    COCOPanopticEvaluator, panoptic drawings, the summary."""
    output = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "tools/run_panoptic_demo.py", "--output", str(output), "--data-dir", str(tmp_path / "data"),
         "--splits", "train:8,val:3", "--images", "2", "--seed", "3",
         "--box-opts", *SHORT, "--mask-opts", *SHORT, "TEST.EVAL_PERIOD", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert "class rows of circle, ellipse, rectangle, triangle, pentagon, hexagon kept" in result.stdout
    mask_config = (output / "masks" / "config.yaml").read_text()
    assert "NUM_CLASSES: 9" in mask_config and "SEED: 3" in mask_config
    assert "MODEL.DETR.FROZEN_WEIGHTS: detector loaded from" in (output / "masks" / "log.txt").read_text()
    rows = [json.loads(line) for line in (output / "masks" / "metrics.json").read_text().splitlines()]
    evaluated = [row for row in rows if "panoptic_seg/PQ" in row]
    assert len(evaluated) == 1
    assert f"[demo] PQ {evaluated[0]['panoptic_seg/PQ']:.1f}" in result.stdout
    assert "things" in result.stdout and "stuff" in result.stdout

    drawings = sorted(path.name for path in (output / "predictions").glob("*.png"))
    assert drawings == ["000000.png", "000000_segments.png", "000001.png", "000001_segments.png"]
    panoptic = json.loads((output / "predictions" / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == 2
