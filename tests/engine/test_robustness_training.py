"""Training that diverges stops with a clear message and keeps the last good checkpoint;
long training keeps its memory flat.

Data and model: tests/conftest.py's two 128-px images, configs/tests/tiny.yaml.
"""
import json
import math

import pytest
import torch

from detr_d2.engine import AtomicDetectionCheckpointer
from detr_d2.engine.finite_checks import check_finite_losses
from detr_d2.errors import NonFiniteValuesError
from tests.helpers import (
    TINY_CONFIG,
    assert_one_line_error,
    run_concurrently,
    run_one,
    tiny_model,
    train_net,
    trains_in_subprocess,
)

# From iteration 3 on the LR is multiplied by 1e30: AdamW's first step at that LR makes
# the weights ~1e27 and the predictions of iteration 4 NaN (seeded; the same every run).
EXPLODING_LR = ["SOLVER.STEPS", "(3,)", "SOLVER.GAMMA", 1e30, "SOLVER.CHECKPOINT_PERIOD", 3,
                "SOLVER.MAX_ITER", 12, "DATASETS.TEST", "()"]
# A class-loss weight beyond float32: loss_ce is inf at iteration 0 while the predictions
# are finite, so the check of the loss terms (not of the predictions) stops training.
INFINITE_LOSS_WEIGHT = ["MODEL.DETR.CLASS_WEIGHT", 1e39, "SOLVER.MAX_ITER", 3, "DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
@trains_in_subprocess
def diverging_runs(datasets_root, tmp_path_factory):
    """(Run, OUTPUT_DIR) of the exploding-LR run and of the infinite-loss run."""
    root = tmp_path_factory.mktemp("diverging")
    dirs = [root / "exploding_lr", root / "infinite_loss"]
    runs = run_concurrently([train_net("OUTPUT_DIR", dirs[0], *EXPLODING_LR),
                             train_net("OUTPUT_DIR", dirs[1], *INFINITE_LOSS_WEIGHT)], datasets_root)
    return list(zip(runs, dirs))


def test_nan_predictions_stop_training_naming_iteration_and_terms(diverging_runs):
    run, output_dir = diverging_runs[0]
    line = assert_one_line_error(run, "FloatingPointError: iteration 4: non-finite loss terms loss_ce, "
                                      "loss_bbox, loss_giou", "model_0000002.pth, is intact")
    assert line.startswith("ERROR: ")
    assert (output_dir / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (output_dir / "model_0000005.pth").exists()
    checkpoint = torch.load(output_dir / "model_0000002.pth", weights_only=True)
    assert checkpoint["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    model = tiny_model("MODEL.DETR.NUM_CLASSES", 80)
    AtomicDetectionCheckpointer(model).load_for_inference(str(output_dir / "model_0000002.pth"))


def test_infinite_loss_term_stops_training_naming_it(diverging_runs):
    run, output_dir = diverging_runs[1]
    assert_one_line_error(run, "FloatingPointError: iteration 0: non-finite loss terms loss_ce=inf",
                          "no checkpoint had been written")
    assert "loss_bbox" not in run.stderr.splitlines()[-1], "finite terms are not listed"
    assert not (output_dir / "last_checkpoint").exists()


def test_loss_check_names_only_the_non_finite_terms():
    losses = {"loss_ce": torch.tensor(0.5), "loss_bbox": torch.tensor(math.nan),
              "loss_giou": torch.tensor(-math.inf)}
    with pytest.raises(FloatingPointError, match=r"^iteration 7: non-finite loss terms "
                                                 r"loss_bbox=nan, loss_giou=-inf$"):
        check_finite_losses(losses, 7)
    check_finite_losses({"loss_ce": torch.tensor(0.5)}, 8)


def test_non_finite_weights_are_not_saved_and_last_checkpoint_stays(tmp_path):
    model = tiny_model("MODEL.DETR.NUM_CLASSES", 3)
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)
    good = (tmp_path / "model_0000004.pth").read_bytes()
    with torch.no_grad():
        model.query_embed.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteValuesError, match=r"not saving .*model_0000009.pth: 1 model tensor\(s\) "
                                                   r"hold NaN/inf values \(query_embed.weight\).*"
                                                   r"model_0000004.pth\) is kept"):
        checkpointer.save("model_0000009", iteration=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert (tmp_path / "model_0000004.pth").read_bytes() == good


# ---------------------------------------------------------------- memory
# Runs in a subprocess: the Trainer of configs/tests/tiny.yaml with the tiny CNN backbone
# (0.03 s/iteration), a hook recording the resident memory after every iteration, a
# checkpoint every 100 iterations and an evaluation every 150; prints the RSS list (MB).
MEMORY_SCRIPT = """
import json, os, sys
import psutil
import detr_d2  # compat fixes first
from detectron2.engine import HookBase
from detectron2.utils.logger import setup_logger
from detr_d2.engine import Trainer, build_config

class RecordRss(HookBase):
    def __init__(self):
        self.rss_mb = []
    def after_step(self):
        self.rss_mb.append(psutil.Process().memory_info().rss / 2**20)

cfg = build_config(sys.argv[1], sys.argv[2:])
os.makedirs(cfg.OUTPUT_DIR)
setup_logger(cfg.OUTPUT_DIR)
trainer = Trainer(cfg)
trainer.resume_or_load(resume=False)
recorder = RecordRss()
trainer.register_hooks([recorder])
trainer.train()
print("RSS_MB " + json.dumps(recorder.rss_mb))
"""
MEMORY_OPTS = ["MODEL.BACKBONE.NAME", "build_tiny_cnn_backbone", "MODEL.BACKBONE.FREEZE_AT", 0,
               "MODEL.TINY_CNN.WIDTH", 16, "MODEL.TINY_CNN.NUM_LAYERS", 4, "MODEL.DETR.IN_FEATURE", "out",
               "SOLVER.MAX_ITER", 300, "SOLVER.CHECKPOINT_PERIOD", 100, "TEST.EVAL_PERIOD", 150]
WARM_UP = 50


@pytest.mark.slow
def test_memory_stays_flat_over_300_iterations(datasets_root, tmp_path):
    output_dir = tmp_path / "out"
    run = run_one(["-c", MEMORY_SCRIPT, TINY_CONFIG, "OUTPUT_DIR", output_dir, *MEMORY_OPTS], datasets_root)
    assert run.returncode == 0, run.output[-3000:]
    rss = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RSS_MB "))[7:])
    assert len(rss) == 300
    after_warm_up, peak_later = rss[WARM_UP - 1], max(rss[WARM_UP:])
    growth = peak_later / after_warm_up - 1
    print(f"RSS after {WARM_UP} iterations {after_warm_up:.1f} MB, peak of iterations {WARM_UP + 1}-300 "
          f"{peak_later:.1f} MB, final {rss[-1]:.1f} MB: growth {100 * growth:.1f}% ({run.seconds:.0f} s)")
    assert growth < 0.10
    assert (output_dir / "model_0000199.pth").exists() and "Evaluation results for bbox" in run.output
