"""tools/benchmark_coco_eval.py: a real (small) run times both COCOeval implementations on
generated data, finds the same stats and writes its numbers."""
import json
import re

import pytest

from tests.helpers import TOOLS, run_python


def test_small_run_times_both_and_finds_the_same_stats(tmp_path):
    result = run_python([TOOLS / "benchmark_coco_eval.py", "--images", 60, "--detections", 20, "--categories", 4,
                         "--json", tmp_path / "report.json"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "COCO bbox evaluation of 1200 detections on 60 images, 4 categories" in result.stdout
    assert re.search(r"^\| total \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|$", result.stdout, re.MULTILINE)
    assert "(the same)" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stats"]["fast"] == pytest.approx(report["stats"]["official"], abs=1e-12)
    assert report["stats"]["fast"][1] > 0.1  # AP50
    assert set(report["seconds"]["fast"]) == {"load", "evaluate", "accumulate", "summarize", "total"}
    assert report["speedup"] > 0
