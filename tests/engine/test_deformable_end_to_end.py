"""DeformableDetr and Dino through the command lines: tools/train_net.py (training with
evaluation and validation losses, --eval-only, --resume) in real subprocesses, then, for
DeformableDetr, the tools on the trained checkpoint (demo, slim_checkpoint, analyze_model,
visualize_data, plot_logs).

Models: configs/tests/tiny_deformable.yaml, DeformableDetr with iterative box refinement
and two-stage queries (the most complete flavour), and Dino of the same sizes with 4
denoising groups. Data: conftest.py's two 128-px images per split, registered as custom
COCO-json datasets (DATASETS.REGISTER_COCO), NUM_CLASSES from them.
"""
import json
import shutil

import pytest
import torch
from PIL import Image

from detr_d2.engine import build_config
from detr_d2.engine.build import build_model
from tests.engine.test_train_net import bbox_results
from tests.helpers import (
    REPO,
    TOOLS,
    assert_succeeded,
    read_metrics,
    run_concurrently,
    run_one,
)

DEFORMABLE_CONFIG = REPO / "configs" / "tests" / "tiny_deformable.yaml"
FLAVOUR = ["MODEL.MULTI_SCALE.WITH_BOX_REFINE", "True", "MODEL.MULTI_SCALE.TWO_STAGE", "True"]
DINO = ["MODEL.META_ARCHITECTURE", "Dino", "MODEL.DINO.DN_NUMBER", "4"]
TOPK, NUM_CLASSES, DRAW_SCALE = 20, 80, 2  # the data's json lists the 80 COCO categories
TWO_STAGE_VALIDATION = ("val/loss", "val/loss_ce", "val/loss_ce_0", "val/loss_ce_enc", "val/loss_bbox_enc",
                        "val/loss_giou_enc", "val/loss_ce_enc_unscaled")


def custom_datasets(datasets_root):
    """KEY VALUE options registering the test data as custom COCO-json sets and using them."""
    coco = datasets_root / "coco"
    sets = tuple((f"custom_{split}", str(coco / "annotations" / f"instances_{split}2017.json"),
                  str(coco / f"{split}2017")) for split in ("train", "val"))
    return ["DATASETS.REGISTER_COCO", repr(sets), "DATASETS.TRAIN", "('custom_train',)",
            "DATASETS.TEST", "('custom_val',)"]


def train_net(datasets_root, output_dir, *opts, args=(), model=FLAVOUR):
    """tools/train_net.py's arguments: the tiny multi-scale config, ``model``'s options
    (DeformableDetr's FLAVOUR or DINO), the custom datasets, OUTPUT_DIR, ``opts``."""
    return [TOOLS / "train_net.py", "--config-file", DEFORMABLE_CONFIG, *args, *model,
            *custom_datasets(datasets_root), "OUTPUT_DIR", output_dir, *map(str, opts)]


@pytest.fixture(scope="module")
def trained(datasets_root, tmp_path_factory):
    """OUTPUT_DIR of 20 training iterations, evaluated (with validation losses) at 10 and 20."""
    output_dir = tmp_path_factory.mktemp("deformable")
    run = run_one(train_net(datasets_root, output_dir, "SOLVER.MAX_ITER", 20, "TEST.EVAL_PERIOD", 10,
                            "TEST.EVAL_LOSSES", "True"), datasets_root)
    assert_succeeded(run)
    return output_dir


@pytest.mark.slow
def test_training_logs_bbox_ap_and_the_two_stage_validation_losses(trained):
    rows = read_metrics(trained)
    training = [row for row in rows if "total_loss" in row]
    assert {"loss_ce", "loss_ce_0", "loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(training[-1])
    evaluations = [row for row in rows if "bbox/AP" in row]
    assert [row["iteration"] for row in evaluations] == [9, 20]  # periodic, then final
    for row in evaluations:
        assert set(TWO_STAGE_VALIDATION) <= set(row), sorted(row)
        assert all(row[key] == row[key] and row[key] >= 0 for key in TWO_STAGE_VALIDATION)  # finite, no NaN
    state = torch.load(trained / "model_final.pth", weights_only=True)["model"]
    assert state["class_embed.0.weight"].shape[0] == NUM_CLASSES  # from the custom json's categories
    assert "class_embed.2.weight" in state and "query_embed.weight" not in state  # 2 layers + proposals
    assert "NUM_CLASSES: 80" in (trained / "config.yaml").read_text()


@pytest.mark.slow
def test_eval_only_reproduces_the_evaluation_of_training(trained, datasets_root, tmp_path):
    run = run_one(train_net(datasets_root, tmp_path, "MODEL.WEIGHTS", trained / "model_final.pth",
                            "TEST.EVAL_LOSSES", "True", args=["--eval-only"]), datasets_root)
    assert_succeeded(run)
    assert bbox_results((tmp_path / "log.txt").read_text()) == pytest.approx(
        bbox_results((trained / "log.txt").read_text()), nan_ok=True)
    name = "inference/validation_losses_custom_val.json"
    evaluated, during_training = (json.loads((folder / name).read_text())["statistics"] for folder in (tmp_path, trained))
    assert evaluated == pytest.approx(during_training)


@pytest.mark.slow
def test_resume_gives_the_weights_of_straight_training(datasets_root, tmp_path):
    """6 iterations straight vs 3, stop, --resume to 6 (LR drop at 4): batches are the whole
    2-image training set without flips, dropout 0 (see test_train_net.py's DETR version)."""
    opts = ["SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3, "SOLVER.STEPS", "(4,)", "DATASETS.TEST", "()"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_succeeded(run_one(train_net(datasets_root, straight, *opts), datasets_root))
    resumed.mkdir()
    shutil.copy(straight / "model_0000002.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    assert_succeeded(run_one(train_net(datasets_root, resumed, *opts, args=["--resume"]), datasets_root))
    assert "Starting training from iteration 3" in (resumed / "log.txt").read_text()
    expected = torch.load(straight / "model_final.pth", weights_only=True)
    actual = torch.load(resumed / "model_final.pth", weights_only=True)
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(actual["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    lrs = [[group["lr"] for group in checkpoint["trainer"]["_trainer"]["optimizer"]["param_groups"]]
           for checkpoint in (expected, actual)]
    assert lrs[0] == lrs[1]


@pytest.fixture(scope="module")
def tool_runs(trained, datasets_root, tmp_path_factory):
    """The tools on the trained run (its config.yaml and model_final.pth), run concurrently:
    (folder of their outputs, {name: Run})."""
    out = tmp_path_factory.mktemp("deformable_tools")
    config, weights = trained / "config.yaml", trained / "model_final.pth"
    commands = {
        "slim": [TOOLS / "slim_checkpoint.py", "--input", weights, "--output", out / "slim.pth"],
        "demo": [TOOLS / "demo.py", "--config-file", config, "--input", datasets_root / "coco" / "val2017",
                 "--output", out / "demo", "--confidence-threshold", 0, "--draw-scale", DRAW_SCALE,
                 "--opts", "MODEL.WEIGHTS", weights],
        "analyze": [TOOLS / "analyze_model.py", "--config-file", config, "--input-size", "128x96",
                    "--json", out / "analyze.json"],
        "data": [TOOLS / "visualize_data.py", "--config-file", config, "--source", "dataloader",
                 "--output-dir", out / "data", "--num", 1],
        "plot": [TOOLS / "plot_logs.py", trained, "--labels", "Deformable DETR", "--x", "iteration", "minutes",
                 "--panels", "bbox/AP", "loss_ce", "--output", out / "curves.png"],
    }
    return out, dict(zip(commands, run_concurrently(list(commands.values()), datasets_root)))


def trained_model(trained):
    cfg = build_config(str(trained / "config.yaml"), ["MODEL.DEVICE", "cpu"], all_datasets_registered=False)
    return build_model(cfg)


@pytest.mark.slow
def test_demo_draws_and_records_the_top_k_detections(tool_runs):
    out, runs = tool_runs
    assert_succeeded(runs["demo"])
    records = json.loads((out / "demo" / "predictions.json").read_text())
    assert len(records) == 2 * TOPK  # threshold 0: every detection of the 2 images
    assert all(0 <= record["score"] <= 1 and 1 <= record["category_id"] <= 90 for record in records)
    for drawing in ("000001.png", "000002.png"):
        assert Image.open(out / "demo" / drawing).size == (128 * DRAW_SCALE, 128 * DRAW_SCALE)


@pytest.mark.slow
def test_slim_checkpoint_holds_exactly_the_models_tensors(tool_runs, trained):
    out, runs = tool_runs
    assert_succeeded(runs["slim"])
    slim = torch.load(out / "slim.pth", weights_only=True)
    assert set(slim) == {"model", "__author__"}
    trained_model(trained).load_state_dict(slim["model"], strict=True)
    full = torch.load(trained / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(tensor, full[name]) for name, tensor in slim["model"].items())


@pytest.mark.slow
def test_analyze_model_counts_the_multi_scale_model(tool_runs, trained):
    out, runs = tool_runs
    assert_succeeded(runs["analyze"])
    report = json.loads((out / "analyze.json").read_text())
    model = trained_model(trained)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    modules = {row["name"]: row for row in report["modules"]}
    for name in ("backbone", "input_proj", "transformer", "class_embed", "bbox_embed"):
        assert modules[name]["parameters"] == sum(p.numel() for p in getattr(model, name).parameters())
    assert modules["transformer"]["flops"] > 0 and "aten::grid_sampler" not in report["uncounted_operators"]


@pytest.mark.slow
def test_data_drawing_and_curves_work_on_the_run(tool_runs):
    out, runs = tool_runs
    assert_succeeded(runs["data"]), assert_succeeded(runs["plot"])
    assert len(list((out / "data").glob("*.png"))) == 1
    assert "validation curves: val/loss_ce" in runs["plot"].output
    assert Image.open(out / "curves.png").size[0] > 500


# ---------------------------------------------------------------- Dino
DINO_TRAINED = ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0")
DINO_EXTRA = ("_interm", "_dn", "_dn_0")  # proposals, denoising queries of the last and first layer


@pytest.fixture(scope="module")
def dino_trained(datasets_root, tmp_path_factory):
    """OUTPUT_DIR of 4 Dino training iterations, a checkpoint after iteration index 1,
    evaluated (with validation losses) at index 1 and at the end."""
    output_dir = tmp_path_factory.mktemp("dino")
    run = run_one(train_net(datasets_root, output_dir, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                            "TEST.EVAL_PERIOD", 2, "TEST.EVAL_LOSSES", "True", model=DINO), datasets_root)
    assert_succeeded(run)
    return output_dir


@pytest.fixture(scope="module")
def dino_runs(dino_trained, datasets_root, tmp_path_factory):
    """Two runs on the trained Dino, started together: --eval-only of its model_final.pth
    (with validation losses) and --resume from its checkpoint after iteration index 1 alone
    in a fresh OUTPUT_DIR (what an interrupted run leaves). ({name: folder}, {name: Run})."""
    folders = {name: tmp_path_factory.mktemp(f"dino_{name}") for name in ("eval", "resumed")}
    shutil.copy(dino_trained / "model_0000001.pth", folders["resumed"])
    (folders["resumed"] / "last_checkpoint").write_text("model_0000001.pth")
    commands = {
        "eval": train_net(datasets_root, folders["eval"], "MODEL.WEIGHTS", dino_trained / "model_final.pth",
                          "TEST.EVAL_LOSSES", "True", args=["--eval-only"], model=DINO),
        "resumed": train_net(datasets_root, folders["resumed"], "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                             "DATASETS.TEST", "()", args=["--resume"], model=DINO),
    }
    return folders, dict(zip(commands, run_concurrently(list(commands.values()), datasets_root)))


@pytest.mark.slow
def test_dino_training_logs_the_denoising_and_proposal_losses_and_bbox_ap(dino_trained):
    rows = read_metrics(dino_trained)
    training = [row for row in rows if "total_loss" in row]
    expected = {name + suffix for name in DINO_TRAINED[:3] for suffix in DINO_EXTRA} | set(DINO_TRAINED)
    assert expected <= set(training[-1]), sorted(training[-1])
    assert all(value == value and value >= 0 for value in (training[-1][name] for name in expected))
    evaluations = [row for row in rows if "bbox/AP" in row]
    assert [row["iteration"] for row in evaluations] == [1, 4]  # periodic, then final
    validation = ({"val/loss"} | {f"val/{name}" for name in DINO_TRAINED}
                  | {f"val/{name}_interm" for name in DINO_TRAINED[:3]})
    for row in evaluations:
        assert validation <= set(row), sorted(row)
        assert all(row[key] == row[key] and row[key] >= 0 for key in validation)  # finite, no NaN
        assert not [key for key in row if "_dn" in key]  # denoising queries exist in training only
    state = torch.load(dino_trained / "model_final.pth", weights_only=True)["model"]
    assert state["label_enc.weight"].shape == (NUM_CLASSES + 1, 64)  # denoising label embedding
    for head in ("class_embed.{}.weight", "bbox_embed.{}.layers.2.weight"):  # one head shared by the 2 layers
        assert torch.equal(state[head.format(0)], state[head.format(1)])


@pytest.mark.slow
def test_dino_eval_only_prints_the_bbox_ap_of_training(dino_trained, dino_runs):
    folders, runs = dino_runs
    assert_succeeded(runs["eval"])
    assert "Evaluation results for bbox" in runs["eval"].output and "|  AP   |  AP50  |" in runs["eval"].output
    evaluated = bbox_results((folders["eval"] / "log.txt").read_text())
    assert evaluated == pytest.approx(bbox_results((dino_trained / "log.txt").read_text()), nan_ok=True)
    name = "inference/validation_losses_custom_val.json"
    statistics = [json.loads((folder / name).read_text())["statistics"] for folder in (folders["eval"], dino_trained)]
    assert statistics[0] == pytest.approx(statistics[1])


@pytest.mark.slow
def test_dino_resume_continues_from_the_checkpoint_with_its_optimizer(dino_trained, dino_runs):
    folders, runs = dino_runs
    assert_succeeded(runs["resumed"])
    resumed = folders["resumed"]
    assert "Starting training from iteration 2" in (resumed / "log.txt").read_text()
    iterations = [row["iteration"] for row in read_metrics(resumed) if "total_loss" in row]
    assert iterations[-1] == 3 and min(iterations) >= 2, iterations
    start = torch.load(resumed / "model_0000001.pth", weights_only=True)
    checkpoints = [torch.load(folder / "model_final.pth", weights_only=True) for folder in (dino_trained, resumed)]
    for checkpoint in checkpoints:
        assert checkpoint["iteration"] == 3
        steps = {state["step"].item() for state in checkpoint["trainer"]["_trainer"]["optimizer"]["state"].values()}
        assert steps == {4.0}  # AdamW's 2 steps before the checkpoint, then 2 more
    assert any(not torch.equal(tensor, start["model"][name]) for name, tensor in checkpoints[1]["model"].items())
