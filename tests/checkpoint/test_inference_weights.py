"""Weights for evaluation/drawing must fit the model completely; training may load partially."""
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from detr_d2.engine import AtomicDetectionCheckpointer, SetupError
from tests.helpers import REPO, config_for_fixture, fixture_dir


@pytest.fixture(scope="module")
def converted_tiny(converted_reference):
    return converted_reference("detr_upstream_tiny")[0]


def test_complete_checkpoint_loads_for_inference(converted_tiny):
    model = build_model(config_for_fixture(fixture_dir("detr_upstream_tiny")))
    AtomicDetectionCheckpointer(model).load_for_inference(str(converted_tiny))
    reference = torch.load(converted_tiny, weights_only=True)["model"]
    torch.testing.assert_close(model.class_embed.weight, reference["class_embed.weight"])


def test_checkpoint_of_another_architecture_is_refused_for_inference(converted_tiny):
    cfg = config_for_fixture(fixture_dir("detr_upstream_tiny"))
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 96
    model = build_model(cfg)
    with pytest.raises(SetupError, match=r"does not fit.*linear1.weight \(checkpoint \(128, 64\), model \(96, 64\)\)"):
        AtomicDetectionCheckpointer(model).load_for_inference(str(converted_tiny))
    AtomicDetectionCheckpointer(model).load(str(converted_tiny))  # training may start from it


def test_eval_only_with_a_mismatched_checkpoint_exits_with_the_message(converted_tiny, tmp_path):
    cfg = config_for_fixture(fixture_dir("detr_upstream_tiny"))
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES = 12
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(config_file),
                             "--eval-only", "MODEL.WEIGHTS", str(converted_tiny), "OUTPUT_DIR", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert "query_embed.weight (checkpoint (10, 64), model (12, 64))" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
